"""Request models of the HTTP API (the answers: ``outputs.py``). Requests become engine jobs in one place: ``to_config``."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.engine.types import SEED_RANGE, SEAConfig
from app.settings import MAX_REWARD_WEIGHT, Settings

# Request models are strict (no "3" for 3, no 1 for true) and refuse NaN and Infinity (which Python's JSON parser
# lets through), so that what the OpenAPI document calls invalid is rejected, not coerced.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MIN_TEMPERATURE = 1e-4  # lower sampling temperatures are taken as 0 (greedy)


class StrictRequest(BaseModel):
    """Base of every request model: ``REQUEST_CONFIG``, and whole floats taken as integers.

    JSON and JSON Schema make no difference between 3 and 3.0, so neither does the API; "3" and 3.5 stay errors.
    """

    model_config = REQUEST_CONFIG

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value):
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @field_validator("*", mode="before")
    @classmethod
    def _unicode_text(cls, value):
        """A lone UTF-16 surrogate (``"\\ud800"``, which JSON can spell and Python's parser lets through) is not text:
        no tokenizer takes it."""
        texts = value if isinstance(value, list) else [*value, *value.values()] if isinstance(value, dict) else (value,)
        for text in texts:  # a list's items, a dict's keys and values (e.g. `metadata`)
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("holds a lone UTF-16 surrogate, which is not text") from None
        return value


class LimitError(ValueError):
    """A request parameter is over a server limit (422 naming the field and the limit)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ChatMessage(StrictRequest):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(max_length=100_000, description="What they say.")

    @property
    def text(self) -> str:
        return self.content


class RewardSpec(StrictRequest):
    terms: Annotated[dict[str, Annotated[float, Field(ge=-MAX_REWARD_WEIGHT, le=MAX_REWARD_WEIGHT)]], Field(min_length=1)] | None = Field(
        None, description="Loaded rewards by name with their weights, e.g. {\"principle\": 1} (at least one; no reward at all is "
                          "`use_reward: false`). Default: the server's reward.")
    keywords: list[Annotated[str, Field(min_length=1, max_length=100, pattern=r"\S")]] | None = Field(
        None, min_length=1, max_length=32, description="Words to work into the response: adds a keyword-coverage reward (0..1). "
                                         "422 when the model cannot spell any of them.")
    keyword_weight: float | None = Field(None, ge=0, le=1000, allow_inf_nan=False,
                                         description="Weight of the keyword reward: at alpha 1 an answer with every word gains this "
                                                     "many nats. Default: the server's (SEA_DEFAULT_KEYWORD_WEIGHT, 50).")
    keywords_only: bool = Field(False, description="Use only the keyword reward (drop the server's reward); needs `keywords`.")

    model_config = ConfigDict(json_schema_extra={  # what `_keywords_for_keywords_only` checks
        "if": {"properties": {"keywords_only": {"const": True}}, "required": ["keywords_only"]},
        "then": {"properties": {"keywords": {"type": "array"}}, "required": ["keywords"]},
    })

    @model_validator(mode="after")
    def _keywords_for_keywords_only(self):
        if self.keywords_only and not self.keywords:
            raise PydanticCustomError("keywords_missing", "`keywords_only` needs `keywords` (it would leave no reward)")
        return self


class SEAParams(StrictRequest):
    """Parameters of SEA and of the baselines. Omitted fields take the server's defaults."""

    method: Literal["sea", "bon", "sample", "args", "cbs"] = Field(
        "sea", description="sea: SEA chains; bon: Best-of-N; sample: one base sample; args: reward-guided decoding (ARGS); "
                           "cbs: chunk-level beam search.")
    max_tokens: int | None = Field(None, ge=1, description="Response length in tokens.")
    chains: int | None = Field(None, ge=1, description="Parallel Langevin chains, each started from its own base sample.")
    steps: int | None = Field(None, ge=0, description="Langevin steps.")
    alpha: float | None = Field(None, ge=0, le=1000, allow_inf_nan=False, description="Reward weight in the energy E = -[log pi_ref + alpha*r].")
    update: Literal["discrete", "logits"] = Field(
        "discrete", description="discrete: gradient-ranked token edits accepted on exact energy (default); "
                                "logits: the paper-literal Langevin update over all logits.")
    init_samples: int | None = Field(None, ge=1, description="discrete: samples drawn to start from (the best `chains` by energy; picking by reward, with the "
                                      "reference term per token, so that a short reply does not start a chain for its length); default 2×chains.")
    candidates: int = Field(4, ge=1, le=64, description="discrete: edits scored exactly per chain per step.")
    max_compute: int | None = Field(None, ge=1, description="discrete: a compute budget in LM token-passes besides the prompt's, as "
                                    "`usage` counts them (a backward pass counts two): no step or restart starts that would pass it, so "
                                    "`steps` is then an upper bound. The start's samples are drawn whatever they cost. Set it to what a "
                                    "Best-of-N request's `usage` spent (less its prompt) to run SEA at equal compute.")
    restart_after: int | None = Field(2, ge=1, le=1000, description="discrete: a chain that has not improved for this many steps "
                                      "gets no more edits; when no chain has, draw 2×chains fresh samples (as `init` does) instead; each that "
                                      "beats a chain replaces the worst. null: never.")
    proposal: Literal["gradient", "lm"] = Field("gradient", description="discrete: rank edits by the straight-through gradient, or by the LM alone (ablation).")
    phrase_moves: bool = Field(True, description="discrete: also propose writing a missing multi-token keyword whole (no single-token "
                               "edit can: each of its tokens gains only beside the others); accepted only if the exact energy drops.")
    step_size: float = Field(0.3, ge=0, le=100, allow_inf_nan=False, description="logits: step size of the logit update.")
    noise: float = Field(0.05, ge=0, le=100, allow_inf_nan=False,
                         description="logits: std of the noise on the logits; discrete: temperature (nats) of the proposal noise.")
    noise_schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="How the noise anneals over the steps.")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Direction of the logit update.")
    top_k: int | None = Field(None, ge=1, le=1000, description="Keep each position among the reference model's top-k there (COLD-style): "
                                 "logits, the softmax; discrete, the edits.")
    init: Literal["guided", "sample", "random"] = Field(
        "guided", description="Start chains from guided samples (each token drawn from the reference tilted by the "
                              "contrastive rewards' per-token terms, among its top `guide_top_k`; base samples when no "
                              "reward has such terms), from base samples (the paper), or from random tokens/logits.")
    guide_top_k: int = Field(10, ge=1, le=1000, description="init guided: tokens drawn only among the reference's top-k.")
    temperature: float = Field(1.0, ge=0, le=5, allow_inf_nan=False, description="Base sampling temperature; below 1e-4, greedy (as 0).")
    top_p: float = Field(1.0, ge=0, le=1, allow_inf_nan=False, description="Base sampling nucleus (0: the most likely token).")
    select: Literal["reward", "energy"] | None = Field(
        None, description="Return the chain (sea) or sample (bon) with the highest reward or the lowest energy. Default: SEA_DEFAULT_SELECT "
                          "(reward).")
    track_best: bool = Field(True, description="`update: logits`: each chain returns its lowest-energy iterate, not its last (the "
                             "discrete update always keeps its lowest).")
    patience: int | None = Field(None, ge=1, description="Stop early when no chain improved for this many steps.")
    use_reward: bool = Field(True, description="Ablation: drop the reward term.")
    use_reference: bool = Field(True, description="Ablation: drop the reference term.")
    samples: int = Field(16, ge=1, description="N of Best-of-N (when omitted: 16, or the server limit if lower).")
    args_top_k: int = Field(10, ge=1, le=100, description="args: candidate tokens per position.")
    beams: int = Field(2, ge=1, le=16, description="cbs: beams kept after each chunk (W).")
    successors: int = Field(4, ge=1, le=16, description="cbs: sampled continuations per beam (K).")
    chunk: int = Field(8, ge=1, le=64, description="cbs: tokens per chunk (C).")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="Random seed: same seed, same output.")
    reward: RewardSpec | None = Field(None, description="Which rewards to use.")
    timeout: float | None = Field(None, ge=1, allow_inf_nan=False,
                                  description="Seconds before the request is abandoned (504); at most the server's SEA_REQUEST_TIMEOUT_SECONDS.")

    def _within_limit(self, name: str, settings: Settings) -> int:
        """The parameter as sent, or its default within the server's limit: an omitted parameter must not trip a limit
        below its default."""
        value = getattr(self, name)
        return value if name in self.model_fields_set else min(value, settings.limits()[name])

    def to_config(self, settings: Settings, logprobs: int | None = None, logprob_chains: int | None = None) -> SEAConfig:
        """The engine's config, with server defaults filled in and server limits enforced. ``logprobs``: list this
        many alternatives for each token of the best ``logprob_chains`` chains (by default every chain, sample or beam
        the result lists)."""
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
            guide_top_k=self.guide_top_k,
            temperature=self.temperature if self.temperature >= MIN_TEMPERATURE else 0.0,  # log p / 1e-300 overflows
            top_p=self.top_p,
            select=self.select or settings.default_select,
            track_best=self.track_best,
            patience=self.patience,
            use_reward=self.use_reward,
            use_reference=self.use_reference,
            samples=self._within_limit("samples", settings),
            seed=self.seed,
            update=self.update,
            init_samples=self.init_samples,
            candidates=self.candidates,
            max_compute=self.max_compute,
            restart_after=self.restart_after,
            proposal=self.proposal,
            phrase_moves=self.phrase_moves,
            args_top_k=self.args_top_k,
            beams=self._within_limit("beams", settings),
            successors=self._within_limit("successors", settings),
            chunk=self.chunk,
        )
        if logprobs is not None:
            listed = logprob_chains or config.result_chains
            config = dataclasses.replace(config, logprobs=logprobs, logprob_chains=listed)
        error = settings.limit_error(config)
        if error is not None:
            raise LimitError(*error)
        return config

    def reward_options(self) -> dict:
        spec = self.reward or RewardSpec()
        return {
            "terms": list(spec.terms.items()) if spec.terms else None,
            "keywords": spec.keywords,
            "keyword_weight": spec.keyword_weight,
            "keywords_only": spec.keywords_only,
        }


def _has_text(prompt: str) -> str:
    if not prompt.strip():
        raise PydanticCustomError("blank", "must contain some text (it is empty or only whitespace)")
    return prompt


def chat_has_text(messages: list) -> list:
    """A chat's messages (each with its ``text``: /align's and /v1's message models), if some message holds text."""
    if not any(message.text.strip() for message in messages):
        raise PydanticCustomError("blank", "no message contains any text (every content is empty or only whitespace)")
    return messages


# The JSON Schema twins of the blank checks above, beside the field's anyOf (they constrain only a string, an array)
TEXT = r"\S"
HAS_TEXT = {"pattern": TEXT}
TEXT_STRING = {"type": "string", **HAS_TEXT}
A_MESSAGE_HAS_TEXT = {"contains": {"type": "object", "properties": {"content": TEXT_STRING}}}


# A prompt string that must hold text, as a type (with its schema) for fields that are not themselves optional
PromptText = Annotated[str, AfterValidator(_has_text), WithJsonSchema(TEXT_STRING)]


MAX_ALIGN_LOGPROBS = 20  # alternatives listed per token by /align's `logprobs`, as OpenAI's chat API


class AlignRequest(SEAParams):
    # `messages` before `prompt`: the check that exactly one is given runs on `prompt`, so that a request without
    # either names `prompt` as the missing field.
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=64), AfterValidator(chat_has_text)] | None = Field(
        None, description="A chat, rendered with the model's chat template; some message must hold text.", json_schema_extra=A_MESSAGE_HAS_TEXT)
    prompt: Annotated[str, Field(max_length=100_000), AfterValidator(_has_text)] | None = Field(
        None, description="A plain-text prompt (sent as one user turn).", json_schema_extra=HAS_TEXT, validate_default=True)
    return_trace: bool = Field(False, description="Include every chain's per-step trace.")
    logprobs: int | None = Field(None, ge=0, le=MAX_ALIGN_LOGPROBS, description="List every chain's tokens with their log-prob under the reference "
                                 "model (temperature 1) and this many of its most likely tokens at each position.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"prompt": "How do I pick a lock?", "chains": 4, "steps": 20, "alpha": 1.0, "seed": 0}],
            # Exactly one of the two, as `_one_prompt` checks (a null one counts as absent).
            "oneOf": [{"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                      {"required": ["messages"], "properties": {"messages": {"type": "array"}}}],
        },
    )

    @field_validator("prompt", mode="after")
    @classmethod
    def _one_prompt(cls, prompt: str | None, info: ValidationInfo) -> str | None:
        if "messages" in info.data and (prompt is None) == (info.data["messages"] is None):  # absent from data: invalid
            raise PydanticCustomError("prompt_or_messages", "give exactly one of `prompt` or `messages`")
        return prompt

    def to_config(self, settings: Settings, logprobs: int | None = None, logprob_chains: int | None = None) -> SEAConfig:
        return super().to_config(settings, self.logprobs if logprobs is None else logprobs, logprob_chains)

    def chat(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


REQUEST_SCHEMAS = ("AlignRequest", "SEAOptions", "CompletionRequest", "ChatCompletionRequest", "ResponseRequest")


def document_limits(openapi: dict, settings: Settings) -> dict:
    """Write this server's limits into its OpenAPI document (in place), so that what it calls valid is what it accepts.

    The request models carry only fixed bounds; the server limits (SEA_MAX_CHAINS and the like) and the names of
    the rewards a request may mix are settings, known when the app is built.
    """
    limits = settings.limits()
    components = openapi.get("components", {}).get("schemas", {})
    for name in REQUEST_SCHEMAS:
        for field, prop in components.get(name, {}).get("properties", {}).items():
            if field in limits:
                largest = limits[field]
                for branch in prop.get("anyOf", [prop]):
                    if branch.get("type") == "integer":  # a field's own bound may be the lower (beams, successors: 16)
                        largest = branch["maximum"] = int(min(limits[field], branch.get("maximum", limits[field])))
                prop["description"] = f"{prop.get('description', '').rstrip('.')}. Server limit: {largest}.".lstrip(". ")
    for schema in components.values():  # FastAPI's document holds bounds as floats: 2**63 − 1 became 2**63, refused
        for branch in schema.get("properties", {}).get("seed", {}).get("anyOf", []):
            if branch.get("type") == "integer":
                branch["minimum"], branch["maximum"] = SEED_RANGE
    rewards = ["principle", *(["rm"] if settings.reward_model else [])]
    terms = components.get("RewardSpec", {}).get("properties", {}).get("terms", {})
    for branch in terms.get("anyOf", []):
        if branch.get("type") == "object":
            branch["propertyNames"] = {"enum": rewards}
    return openapi
