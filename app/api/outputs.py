"""The HTTP API's answers: /align's result (chains, traces, token log-probs, usage, timings), a job's status, and
the OpenAI-shaped error body."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import (
    BaseModel,
    Field,
)

from app.engine.types import AlignResult


class StepOut(BaseModel):
    energy: float
    reward: float
    log_prob_ref: float
    changed: float = Field(description="Fraction of tokens that differ from the chain's initial sample (after a restart: the sample it restarted from).")
    finite: bool


class TopTokenOut(BaseModel):
    token: int
    text: str = Field(description="The token's text (`bytes:\\x..` for a part of a character's UTF-8 bytes).")
    log_prob: float


class TokenOut(TopTokenOut):
    top: list[TopTokenOut] = Field(description="The reference's most likely tokens at this position, best first.")


class ChainOut(BaseModel):
    text: str
    reward: float
    log_prob_ref: float
    energy: float
    best_step: int = Field(description="Step of the returned iterate (0 = the initial sample).")
    initial: StepOut = Field(description="The sample the chain started from; after a restart replaced it, the sample it restarted from.")
    trace: list[StepOut] | None = Field(None, description="One entry per step (with return_trace).")
    tokens: list[TokenOut] | None = Field(None, description="With `logprobs`: each token that counts (up to and including the "
                                          "end-of-turn token), its log-prob under the reference (they sum to `log_prob_ref`).")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forward_token_passes: int = Field(description="Tokens run forward through an LM for this request.")
    backward_token_passes: int = Field(description="Tokens run backward through an LM for this request.")
    prompt_token_passes: int = Field(description="Of the forward ones, encoding the prompt (the reference's and each reward's own).")
    compute: int = Field(description="forward + 2 × backward token-passes, less the prompt's: what `max_compute` bounds.")


class TimingsOut(BaseModel):
    queue: float = Field(description="Seconds waiting for the engine.")
    init: float = Field(description="Seconds for the prompt and the initial samples (a baseline's whole run).")
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
    seed: int | None = Field(None, description="The random seed the run used: the request's, or one the server drew when the "
                                               "request gave none. Send it back to repeat the run.")
    chains: list[ChainOut]
    usage: UsageOut
    timings: TimingsOut

    @classmethod
    def build(cls, job_id: str, model: str, result: AlignResult, queue_seconds: float, with_trace: bool,
              piece: Callable[[int], str] | None = None) -> AlignResponse:
        """``piece``: a token id's text (for listed log-probs; needed when the result has them)."""
        def step(s) -> StepOut:
            return StepOut(energy=s.energy, reward=s.reward, log_prob_ref=s.log_prob_ref, changed=s.changed, finite=s.finite)

        def tokens(entries) -> list[TokenOut] | None:
            if entries is None:
                return None
            return [TokenOut(token=e.token, text=piece(e.token), log_prob=e.log_prob,
                             top=[TopTokenOut(token=t, text=piece(t), log_prob=p) for t, p in e.top]) for e in entries]

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
            seed=result.seed,
            chains=[
                ChainOut(text=c.text, reward=c.reward, log_prob_ref=c.log_prob_ref, energy=c.energy, best_step=c.best_step,
                         initial=step(c.initial), trace=[step(s) for s in c.trace] if with_trace else None,
                         tokens=tokens(c.token_log_probs))
                for c in result.chains
            ],
            usage=UsageOut(
                prompt_tokens=result.usage.prompt_tokens,
                completion_tokens=result.usage.completion_tokens,
                total_tokens=result.usage.prompt_tokens + result.usage.completion_tokens,
                forward_token_passes=result.usage.forward_token_passes,
                backward_token_passes=result.usage.backward_token_passes,
                prompt_token_passes=result.usage.prompt_token_passes,
                compute=result.usage.budgeted,
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
