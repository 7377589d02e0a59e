"""A request in flight in the engine (:class:`RequestState`), and a start of requests admitted together
(:class:`Starting`)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from app.engine.energy import RowSpec
from app.engine.types import AlignJob, AlignResult, SEAConfig, StepStats, Timings, Usage


@dataclass(eq=False)
class Starting:
    """The discrete update's start of requests admitted together: one batched draw of their initial samples and one
    scoring pass, a generator that pauses after each drawn token (so that the running batch steps meanwhile)."""

    states: list[RequestState]
    run: Generator[None, None, None]


@dataclass(eq=False)  # compared by identity (`in` a list of states): its fields hold tensors
class RequestState:
    """One request in flight: its chains' logits and everything accumulated about them."""

    job: AlignJob
    spec: RowSpec
    generator: torch.Generator
    logits: Tensor | None  # (C, L, V) float32 Langevin state; None for methods without one
    initial_tokens: Tensor  # (C, L)
    usage: Usage
    timings: Timings
    started: float
    seed: int  # what the generator was seeded with (the request's seed, or one drawn for it)
    step: int = -1  # steps taken (edits or logit updates); -1 until the initial chains are scored
    grad: Tensor | None = None  # (C, L, V) dE/dy at the current iterate
    adam_m: Tensor | None = None
    adam_v: Tensor | None = None
    top_k: Tensor | None = None  # (C, L, k) reference top-k per position, for constrained decoding
    tokens: Tensor | None = None  # (C, L) the iterate scored last
    best_energy: Tensor | None = None  # (C,) of the iterate each chain returns (its lowest, or its last: track_best)
    lowest_energy: Tensor | None = None  # (C,) logits update: each chain's lowest so far (what `patience` watches)
    best_reward: Tensor | None = None
    best_log_prob: Tensor | None = None
    best_tokens: Tensor | None = None  # (C, L)
    best_step: Tensor | None = None  # (C,) long
    initial: list[StepStats] = field(default_factory=list)
    traces: list[list[StepStats]] = field(default_factory=list)
    table: Tensor | None = None  # discrete, gradient-free ablation: (C, L, V) reference log-probs
    counted: Tensor | None = None  # discrete: (C,) tokens that count per chain
    tried: list[set] = field(default_factory=list)  # discrete: edits already rejected at the current tokens
    memories: dict | None = None  # discrete: per LM scorer, the memory of the gradient pass at the current tokens
    stale: set[int] = field(default_factory=set)  # discrete: chains whose grad and memory are of tokens they left
    stalls: list[int] = field(default_factory=list)  # discrete: per chain, steps since it last improved
    candidate_rows: int = 0
    steps_since_improved: int = 0
    nonfinite_steps: int = 0
    done: bool = False
    cancelled: bool = False
    result: AlignResult | None = None
    baseline: Generator[None, None, AlignResult | None] | None = None  # a baseline's run, advanced by Engine.advance
    starting: Starting | None = None  # the discrete update's start while it draws, advanced by Engine.advance_start

    @property
    def config(self) -> SEAConfig:
        return self.job.config

    @property
    def chains(self) -> int:
        return self.spec.rows

    @property
    def needs_grad(self) -> bool:
        """Whether the iterate about to be scored (after this tick's update) will be followed by another update."""
        return max(self.step, 0) < self.config.steps
