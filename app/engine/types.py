"""The engine's own request and result types: plain dataclasses, no HTTP and no pydantic."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

from models.rewards import Prompt, RewardMix

Method = Literal["sea", "bon", "sample", "args", "cbs"]
SEED_RANGE = (-(2**63), 2**63 - 1)  # the seeds a request may give: any 64-bit integer, as OpenAI takes
MAX_DRAWN_SEED = 2**53 - 1  # a seed the server draws stays below the largest integer JavaScript clients hold exactly


@dataclass
class SEAConfig:
    """Sampling parameters of one request. Units: tokens, steps, nats."""

    max_tokens: int = 32
    chains: int = 4
    steps: int = 20
    alpha: float = 1.0  # weight of the reward in the energy  E = −[log pi_ref + alpha·r]
    # "discrete": gradient-informed token edits with exact acceptance (default; app/engine/proposals.py).
    # "logits": the paper-literal update y ← y − step·∇E + noise over all L×V logits.
    update: Literal["discrete", "logits"] = "discrete"
    init_samples: int | None = None  # discrete: samples drawn to start from (best `chains`: starts._start_rank); None: 2×chains
    candidates: int = 4  # discrete: edits evaluated exactly per chain per step
    # discrete: a chain that has not improved for this many steps is parked (no more edits); when every chain is,
    # a step draws 2×chains fresh base samples instead, and each that beats a chain takes the place of the worst
    # one (None: never park or restart; needs init "sample")
    restart_after: int | None = 2
    proposal: Literal["gradient", "lm"] = "gradient"  # discrete: rank edits by the STE gradient, or by the LM alone (ablation)
    phrase_moves: bool = True  # discrete: also propose writing a missing multi-token rewarded word whole (proposals.py)
    max_estimate: float = 0.0  # discrete: only edits whose first-order energy change is at most this (nats) are scored
    max_compute: int | None = None  # discrete: stop before a step would push compute (Usage.compute, less the prompt's) past this
    step_size: float = 0.3  # logits: learning rate of the logit update
    noise: float = 0.05  # logits: std of the noise on the logits; discrete: temperature (nats) of the Gumbel proposal noise
    noise_schedule: Literal["constant", "linear", "cosine"] = "linear"  # annealed towards 0 over the steps
    optimizer: Literal["adam", "sgd"] = "adam"  # logits only
    top_k: int | None = None  # each position among the reference LM's top-k there (COLD-style; logits: the softmax, discrete: the edits)
    # "guided": chains start from samples drawn token by token from the reference tilted by the rewards' per-token
    # terms (a contrastive reward; see energy.token_tilt), among its top `guide_top_k`; base samples when the rewards
    # have none. "sample": base samples of the reference (the paper). "random": random tokens or logits.
    init: Literal["guided", "sample", "random"] = "guided"
    guide_top_k: int = 10
    temperature: float = 1.0  # base-policy sampling temperature (initial chains, samples, Best-of-N)
    top_p: float = 1.0
    select: Literal["reward", "energy"] = "reward"  # how the returned chain is picked (the paper: by reward)
    track_best: bool = True  # logits update: each chain returns its lowest-energy iterate instead of the last one
    patience: int | None = None  # stop a request early when no chain's best energy improved for this many steps
    use_reward: bool = True  # ablations: drop the reward or the reference term from the energy
    use_reference: bool = True
    seed: int | None = None
    method: Method = "sea"
    samples: int = 16  # N of Best-of-N
    args_top_k: int = 10  # ARGS: candidates per token
    beams: int = 2  # CBS: beams kept (W)
    successors: int = 4  # CBS: sampled continuations per beam (K)
    chunk: int = 8  # CBS: tokens per chunk (C)
    # Report the reference's log-prob of each token of the best `logprob_chains` chains (ranked_chains), with its
    # `logprobs` most likely tokens at each position (0: none); None: no log-probs (OpenAI's `logprobs`).
    logprobs: int | None = None
    logprob_chains: int = 1

    @property
    def batch_rows(self) -> int:
        """Rows the request holds in the running batch: SEA's chains; a baseline's run one (its own batches are its own)."""
        return self.chains if self.method == "sea" else 1

    @property
    def result_chains(self) -> int:
        """How many chains the result lists: SEA's chains, Best-of-N's samples, beam search's beams, one otherwise."""
        return {"sea": self.chains, "bon": self.samples, "cbs": self.beams}.get(self.method, 1)


@dataclass
class AlignJob:
    """One unit of engine work: a prompt, its parameters and its reward."""

    prompt: Prompt
    config: SEAConfig
    reward: RewardMix
    # True once nobody waits for the result (cancelled, past its deadline). Checked at each token the start draws
    # (tens of seconds on a CPU), so that an abandoned start stops there, as a running request stops at its next step.
    abandoned: Callable[[], bool] | None = None

    def is_abandoned(self) -> bool:
        return self.abandoned is not None and self.abandoned()


@dataclass
class StepStats:
    """One chain after one Langevin step (energies in nats, summed over the response tokens)."""

    energy: float
    reward: float
    log_prob_ref: float
    changed: float  # fraction of counted tokens that differ from the chain's initial sample
    finite: bool = True


@dataclass
class TokenLogProb:
    """A response token's log-prob under the reference model (temperature 1), and the reference's most likely tokens
    at its position, best first."""

    token: int
    log_prob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ChainResult:
    text: str
    tokens: list[int]
    reward: float
    log_prob_ref: float
    energy: float
    best_step: int  # 0 = the initial sample
    initial: StepStats
    trace: list[StepStats] = field(default_factory=list)
    counted: int = 1  # tokens that count (up to and including the first stop)
    token_log_probs: list[TokenLogProb] | None = None  # its counted tokens', when the request asked (SEAConfig.logprobs)


def reward_pick(reward: float, log_prob_ref: float, counted: int) -> tuple[float, float]:
    """What picking by reward compares, higher first: the reward, then log pi_ref per token (a word-list reward ties
    often, and the energy's sum over tokens would favour a fragment)."""
    return reward, log_prob_ref / max(counted, 1)


def chain_order(chains: list[ChainResult], select: str) -> list[int]:
    """Chain indices best first: by :func:`reward_pick`, or by lowest energy. Chains with a non-finite energy come last.
    Chains holding the same tokens are scored as the first of them (their scores may differ in the last bits, which
    depend on the batch): the lowest index of equals comes first."""
    first = {}
    for i, chain in enumerate(chains):
        first.setdefault(tuple(chain.tokens), i)

    def key(i: int) -> tuple[float, ...]:
        chain = chains[first[tuple(chains[i].tokens)]]
        if not math.isfinite(chain.energy):
            return (math.inf, math.inf)
        if select == "energy":
            return (chain.energy,)
        return tuple(-value for value in reward_pick(chain.reward, chain.log_prob_ref, chain.counted))

    return sorted(range(len(chains)), key=key)


def best_chain(chains: list[ChainResult], select: str) -> int:
    return chain_order(chains, select)[0]


def ranked_chains(chains: list[ChainResult], chosen: int, n: int, select: str) -> list[int]:
    """The best ``n`` chains: the chosen one first, then the others by the same criterion (OpenAI's ``n`` choices)."""
    order = chain_order(chains, select)
    order.remove(chosen)
    return [chosen, *order][:n]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_token_passes: int = 0  # tokens run forward through an LM (prompts, samples, energies), all models
    backward_token_passes: int = 0  # tokens run backward through an LM
    prompt_token_passes: int = 0  # of the forward ones, encoding the prompt (the reference's, and each reward's own)

    @property
    def compute(self) -> int:
        """Compute in forward-token-pass units: a backward pass costs about two forward passes."""
        return self.forward_token_passes + 2 * self.backward_token_passes

    @property
    def budgeted(self) -> int:
        """The compute a budget (``max_compute``, ``sea eval``'s) covers: the response's work, not the prompt's
        encoding, which every method pays alike."""
        return self.compute - self.prompt_token_passes


@dataclass
class Timings:
    """Where a run's wall time went, in seconds (its start's draw and scoring, its steps, all of it), and how many
    steps it took."""

    init: float = 0.0
    langevin: float = 0.0
    total: float = 0.0
    steps: int = 0


@dataclass
class AlignResult:
    method: str
    text: str
    reward: float
    log_prob_ref: float
    energy: float
    energy_per_token: float
    chosen: int
    chains: list[ChainResult]
    usage: Usage
    timings: Timings
    finish_reason: Literal["stop", "length"]
    nonfinite_steps: int = 0
    seed: int | None = None  # the seed the run used: the request's, or one drawn for it (None: stored before it was kept)

    def to_dict(self) -> dict:
        return asdict(self)


def noise_at(config: SEAConfig, step: int) -> float:
    """Noise (logit std or proposal temperature) at update ``step`` (1-based), annealed by the schedule."""
    if config.noise_schedule == "constant" or config.steps <= 1:
        return config.noise
    progress = (step - 1) / (config.steps - 1)
    if config.noise_schedule == "linear":
        return config.noise * (1.0 - progress)
    return config.noise * 0.5 * (1.0 + math.cos(math.pi * progress))
