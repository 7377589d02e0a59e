"""Request and response models of the HTTP API. Requests become engine jobs in one place: ``to_config``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.engine.types import AlignResult, SEAConfig
from app.settings import Settings


class LimitError(ValueError):
    """A request parameter is over a server limit (422 naming the field and the limit)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(max_length=100_000, description="What they say.")


class RewardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    terms: dict[str, float] | None = Field(None, description="Loaded rewards by name with their weights, e.g. {\"principle\": 1}. Default: the server's reward.")
    keywords: list[str] | None = Field(None, max_length=32, description="Words to work into the response: adds a keyword-coverage reward (0..1).")
    keyword_weight: float = Field(1.0, ge=0, le=1000, allow_inf_nan=False, description="Weight of the keyword reward.")
    keywords_only: bool = Field(False, description="Use only the keyword reward (drop the server's reward).")


class SEAParams(BaseModel):
    """Parameters of SEA and of the baselines. Omitted fields take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["sea", "bon", "sample"] = Field("sea", description="sea: Langevin chains; bon: Best-of-N; sample: one base sample.")
    max_tokens: int | None = Field(None, ge=1, description="Response length in tokens.")
    chains: int | None = Field(None, ge=1, description="Parallel Langevin chains, each started from its own base sample.")
    steps: int | None = Field(None, ge=0, description="Langevin steps.")
    alpha: float | None = Field(None, ge=0, le=1000, allow_inf_nan=False, description="Reward weight in the energy E = -[log pi_ref + alpha*r].")
    step_size: float = Field(0.3, ge=0, le=100, allow_inf_nan=False, description="Step size of the logit update.")
    noise: float = Field(0.05, ge=0, le=100, allow_inf_nan=False, description="Std of the Langevin noise on the logits.")
    noise_schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="How the noise anneals over the steps.")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Direction of the logit update.")
    top_k: int | None = Field(None, ge=1, le=1000, description="Decode each position among the reference model's top-k (COLD-style).")
    init: Literal["sample", "random"] = Field("sample", description="Start chains from base samples or random logits.")
    temperature: float = Field(1.0, ge=0, le=5, allow_inf_nan=False, description="Base sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="Base sampling nucleus.")
    select: Literal["reward", "energy"] = Field("reward", description="Return the chain with the highest reward or the lowest energy.")
    track_best: bool = Field(True, description="Each chain keeps its lowest-energy iterate.")
    patience: int | None = Field(None, ge=1, description="Stop early when no chain improved for this many steps.")
    use_reward: bool = Field(True, description="Ablation: drop the reward term.")
    use_reference: bool = Field(True, description="Ablation: drop the reference term.")
    samples: int = Field(16, ge=1, description="N of Best-of-N.")
    seed: int | None = Field(None, ge=0, le=2**62, description="Random seed: same seed, same output.")
    reward: RewardSpec | None = Field(None, description="Which rewards to use.")
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False, description="Seconds before the request is abandoned (504).")

    def to_config(self, settings: Settings) -> SEAConfig:
        """The engine's config, with server defaults filled in and server limits enforced."""
        config = SEAConfig(
            method=self.method,
            max_tokens=self.max_tokens or settings.default_max_tokens,
            chains=self.chains or settings.default_chains,
            steps=settings.default_steps if self.steps is None else self.steps,
            alpha=settings.default_alpha if self.alpha is None else self.alpha,
            step_size=self.step_size,
            noise=self.noise,
            noise_schedule=self.noise_schedule,
            optimizer=self.optimizer,
            top_k=self.top_k,
            init=self.init,
            temperature=self.temperature,
            top_p=self.top_p,
            select=self.select,
            track_best=self.track_best,
            patience=self.patience,
            use_reward=self.use_reward,
            use_reference=self.use_reference,
            samples=self.samples,
            seed=self.seed,
        )
        for name, value, limit in (
            ("max_tokens", config.max_tokens, settings.max_tokens_limit),
            ("chains", config.chains, settings.max_chains),
            ("steps", config.steps, settings.max_steps),
            ("samples", config.samples, settings.max_samples),
        ):
            if value > limit:
                raise LimitError(name, f"{name} must be at most {limit} (server limit), got {value}")
        if config.chains > settings.max_batch_chains:
            raise LimitError("chains", f"chains must be at most {settings.max_batch_chains} (the engine batch size)")
        return config

    def reward_options(self) -> dict:
        spec = self.reward or RewardSpec()
        return {
            "terms": list(spec.terms.items()) if spec.terms else None,
            "keywords": spec.keywords,
            "keyword_weight": spec.keyword_weight,
            "keywords_only": spec.keywords_only,
        }


class AlignRequest(SEAParams):
    prompt: str | None = Field(None, max_length=100_000, description="A plain-text prompt (sent as one user turn).")
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=64, description="A chat, rendered with the model's chat template.")
    return_trace: bool = Field(False, description="Include every chain's per-step trace.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "How do I pick a lock?", "chains": 4, "steps": 20, "alpha": 1.0, "seed": 0}]},
    )

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    def chat(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


class StepOut(BaseModel):
    energy: float
    reward: float
    log_prob_ref: float
    changed: float = Field(description="Fraction of tokens that differ from the chain's initial sample.")
    finite: bool


class ChainOut(BaseModel):
    text: str
    reward: float
    log_prob_ref: float
    energy: float
    best_step: int = Field(description="Step of the returned iterate (0 = the initial sample).")
    initial: StepOut
    trace: list[StepOut] | None = Field(None, description="One entry per step (with return_trace).")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forward_token_passes: int = Field(description="Tokens run forward through an LM for this request.")
    backward_token_passes: int = Field(description="Tokens run backward through an LM for this request.")


class TimingsOut(BaseModel):
    queue: float = Field(description="Seconds waiting for the engine.")
    init: float = Field(description="Seconds for the prompt and the initial samples.")
    langevin: float = Field(description="Seconds in Langevin steps.")
    total: float = Field(description="Seconds from entering the engine to the result.")
    steps: int = Field(description="Steps run.")


class AlignResponse(BaseModel):
    id: str
    model: str
    method: str
    text: str
    reward: float
    log_prob_ref: float
    energy: float
    energy_per_token: float
    finish_reason: Literal["stop", "length"]
    chosen: int = Field(description="Index of the returned chain.")
    chains: list[ChainOut]
    usage: UsageOut
    timings: TimingsOut

    @classmethod
    def build(cls, job_id: str, model: str, result: AlignResult, queue_seconds: float, with_trace: bool) -> "AlignResponse":
        def step(s) -> StepOut:
            return StepOut(energy=s.energy, reward=s.reward, log_prob_ref=s.log_prob_ref, changed=s.changed, finite=s.finite)

        return cls(
            id=job_id,
            model=model,
            method=result.method,
            text=result.text,
            reward=result.reward,
            log_prob_ref=result.log_prob_ref,
            energy=result.energy,
            energy_per_token=result.energy_per_token,
            finish_reason=result.finish_reason,
            chosen=result.chosen,
            chains=[
                ChainOut(text=c.text, reward=c.reward, log_prob_ref=c.log_prob_ref, energy=c.energy, best_step=c.best_step,
                         initial=step(c.initial), trace=[step(s) for s in c.trace] if with_trace else None)
                for c in result.chains
            ],
            usage=UsageOut(
                prompt_tokens=result.usage.prompt_tokens,
                completion_tokens=result.usage.completion_tokens,
                total_tokens=result.usage.prompt_tokens + result.usage.completion_tokens,
                forward_token_passes=result.usage.forward_token_passes,
                backward_token_passes=result.usage.backward_token_passes,
            ),
            timings=TimingsOut(queue=queue_seconds, init=result.timings.init, langevin=result.timings.langevin,
                               total=result.timings.total, steps=result.timings.steps),
        )


class JobCreated(BaseModel):
    id: str
    status: str
    location: str


class JobOut(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    position: int | None = Field(None, description="Place in the queue while queued (0 = next).")
    created: float = Field(description="Unix time the job was accepted.")
    error: str | None = None
    result: AlignResponse | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
