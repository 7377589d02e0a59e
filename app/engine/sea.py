"""Simple Energy Adaptation: Langevin dynamics over per-position token logits, batched over requests.

A request becomes a :class:`RequestState` (``Engine.start``: prompt keys/values, reward contexts,
initial chains from the base policy). ``Engine.tick`` advances every state in a list by one step,
batched, so requests can join and leave a running batch between ticks. The discrete update (the
default, ``app.engine.discrete``) scores its initial chains at the start and edits them each tick;
the paper-literal logits update scores its initial chains at tick 0, and tick k applies the k-th
logit update and scores the new iterate. Baselines run as generators that ``Engine.advance`` resumes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from app.engine import discrete, starts
from app.engine.energy import Evaluation, RowSpec, evaluate, passes_per_row
from app.engine.host import to_host
from app.engine.sampling import rows_per_pass, run_for, sample_responses
from app.engine.types import (
    MAX_DRAWN_SEED,
    AlignJob,
    AlignResult,
    ChainResult,
    SEAConfig,
    StepStats,
    Timings,
    TokenLogProb,
    Usage,
    best_chain,
    ranked_chains,
)
from models.lm import Prefix, encode_prefix, log_probs_with_top, stack_prefixes, stop_token_ids
from models.loading import LoadedLM

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
INIT_MARGIN = 1.0  # the sampled token's logit sits this far above the LM's best alternative, so argmax(y0) = sample


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


class Engine:
    """Runs SEA and the sampling baselines on one reference LM. Not thread-safe: one worker owns it."""

    def __init__(self, lm: LoadedLM):
        self.lm = lm
        self.device = lm.device
        self.use_stop_ids(stop_token_ids(lm.tokenizer, lm.model))
        self.vocab = lm.model.get_output_embeddings().weight.shape[0]

    def use_stop_ids(self, ids: list[int]) -> None:
        """The token ids that end a response, on the device and on the host (each read of a device tensor waits for
        the device): the first also pads shorter responses in a batch."""
        self.stop_ids = torch.tensor(ids, device=self.device)
        self.stop_set = set(ids)
        self.pad_id = ids[0]

    # ----- request lifecycle -------------------------------------------------------------------

    def start(self, job: AlignJob) -> RequestState:
        """Prepare a request: prompt keys/values, reward contexts, initial chains (or a baseline's run, to advance)."""
        return self.start_many([job])[0]

    def start_many(self, jobs: list[AlignJob], sliced: bool = False) -> list[RequestState]:
        """Start requests admitted together; the discrete update's initial samples of all of them come in one batch,
        drawn here, or, ``sliced``, by ``advance_start`` (between other requests' steps) while the states hold it as
        ``starting``."""
        from app.engine.baselines import baseline_run  # baselines build on this module

        started = time.perf_counter()  # one stamp for all: each job waits for the others' prompts to be encoded too
        states = [self._prepare(job, started) for job in jobs]
        for state in states:
            if state.job.is_abandoned():
                self.cancel(state)  # e.g. a Best-of-N request cancelled while the one before it ran
            elif state.config.method != "sea":
                state.baseline = baseline_run(self, state)  # run by advance(), between other requests' steps
            elif state.config.update != "discrete":
                self._start_logits(state)
        discrete_states = [s for s in states if not s.done and s.config.method == "sea" and s.config.update == "discrete"]
        if discrete_states:
            starting = Starting(discrete_states, starts.starting(self, discrete_states))
            for state in discrete_states:
                state.starting = starting
            if not sliced:
                self.advance_start(starting)
        return states

    def advance_start(self, starting: Starting, seconds: float = math.inf) -> bool:
        """Run a start's pieces of work (a drawn token each) for about ``seconds`` (at least one piece), or to its end;
        True when it ended: its states then hold their scored initial chains (or their result, with no steps to run)."""
        try:
            ended, _ = run_for(starting.run, seconds)
        except BaseException:
            self._end_start(starting)  # its states hold no start to resume (and no reference cycle through it)
            raise
        if not ended:
            return False
        self._end_start(starting)
        for state in starting.states:
            state.timings.init = time.perf_counter() - state.started
            if state.done and not state.cancelled:
                state.result = self.result(state)
        return True

    def _prepare(self, job: AlignJob, started: float) -> RequestState:
        config = job.config
        generator = torch.Generator(device=self.device)
        seed = config.seed if config.seed is not None else int(torch.randint(0, MAX_DRAWN_SEED + 1, (1,)).item())
        generator.manual_seed(seed)
        prefix = encode_prefix(self.lm.model, job.prompt.ids)
        terms = [(component, weight, component.prepare(job.prompt)) for component, weight in job.reward.terms]
        rows = config.batch_rows
        spec = RowSpec(prefix, terms, config.alpha, config.use_reward, config.use_reference, config.max_tokens, rows)
        prompt_tokens = len(job.prompt.ids)
        # the reference's prompt and each reward's own context (the principle's is longer; a word list encodes none)
        prompt_passes = prefix.length + sum(context.length for _, _, context in terms if isinstance(context, Prefix))
        usage = Usage(prompt_tokens=prompt_tokens, forward_token_passes=prompt_passes, prompt_token_passes=prompt_passes)
        return RequestState(job, spec, generator, None, torch.empty(0), usage, Timings(), started, seed)

    def _start_logits(self, state: RequestState) -> None:
        """Initial logits of the paper-literal update: random, or the LM's log-probs around (base or guided) samples."""
        config, rows, generator, usage = state.config, state.chains, state.generator, state.usage
        if config.init == "random":
            logits = torch.randn(rows, config.max_tokens, self.vocab, generator=generator, device=self.device)
            tokens = logits.argmax(-1)
        else:
            tilt = starts.start_tilt(self, state)
            samples = sample_responses(
                self.lm.model, state.spec.prefix, rows, config.max_tokens, self.stop_ids, generator,
                config.temperature, config.top_p, keep_log_probs=True, tilt=tilt,
            )
            usage.forward_token_passes += samples.forward_token_passes
            tokens = samples.tokens
            # COLD-style start: the LM's own log-probs, with the sampled token lifted to the top.
            logits = samples.log_probs.clone()  # (C, L, V)
            top = logits.max(-1, keepdim=True).values
            logits.scatter_(-1, tokens[..., None], top + INIT_MARGIN)
        state.logits = logits
        state.initial_tokens = tokens
        state.timings.init = time.perf_counter() - state.started

    def cancel(self, state: RequestState) -> None:
        state.cancelled = True
        state.done = True
        if state.baseline is not None:
            state.baseline.close()
        starting = state.starting
        if starting is not None and not starting.run.gi_running and all(s.cancelled for s in starting.states):
            self._end_start(starting)  # nobody left to draw for (a start cancels the abandoned itself, while it runs)

    @staticmethod
    def _end_start(starting: Starting) -> None:
        starting.run.close()
        for state in starting.states:
            state.starting = None

    def advance(self, state: RequestState, seconds: float = math.inf) -> None:
        """Run a baseline request's pieces of work (a drawn token each) for about ``seconds`` (at least one piece), or
        to its end: it is then done, with its result (cancelled if abandoned meanwhile)."""
        ended, result = run_for(state.baseline, seconds)
        if ended:
            state.result = result
            state.done = True
            if result is None:
                self.cancel(state)

    def run(self, jobs: list[AlignJob]) -> list[AlignResult]:
        """Run jobs to completion in one batch (the CLI and tests; the service drives ``start``/``tick`` itself)."""
        states = self.start_many(jobs)
        while running := [s for s in states if not s.done]:
            for state in running:
                if state.baseline is not None:
                    self.advance(state)
            if stepping := [s for s in running if s.baseline is None]:
                self.tick(stepping)
        for state in states:
            self.attach_token_log_probs(state)
        return [s.result for s in states]

    # ----- one batched step --------------------------------------------------------------------

    def tick(self, states: list[RequestState]) -> None:
        """Advance every SEA state by one step: the discrete update's in one batched step, the logits update's in one
        batched forward/backward pass (a baseline runs by ``advance``)."""
        tick_started = time.perf_counter()
        stepped = [s for s in states if s.config.update == "discrete"]
        if stepped:
            discrete.tick(self, stepped)
            elapsed = time.perf_counter() - tick_started
            for state in stepped:
                state.timings.langevin += elapsed
                if state.done and not state.cancelled:  # cancelled: abandoned while a restart drew for it
                    state.result = self.result(state)
                    state.grad = state.table = state.memories = state.top_k = None
        states = [s for s in states if s.config.update != "discrete"]
        if not states:
            return
        tick_started = time.perf_counter()
        for state in states:
            # A state whose last evaluation failed (out of memory) has no gradient and is simply re-scored.
            if state.grad is not None:
                self._update(state)
        need_grad = any(s.needs_grad for s in states)
        evaluation = self._evaluate(states, with_grad=need_grad)
        elapsed = time.perf_counter() - tick_started
        offset = 0
        for state in states:
            rows = slice(offset, offset + state.chains)
            offset += state.chains
            self._record(state, evaluation, rows, need_grad and state.needs_grad)
            state.timings.langevin += elapsed
            if state.done:
                state.result = self.result(state)
                state.grad = state.adam_m = state.adam_v = state.logits = None

    def _evaluate(self, states: list[RequestState], with_grad: bool) -> Evaluation:
        length = max(s.spec.length for s in states)
        tokens, logits, allowed = [], [], []
        top_k = max((s.config.top_k or 0) for s in states) or None
        for state in states:
            y = state.logits
            token_ids = self._decode_tokens(state)
            pad = length - y.shape[1]
            if pad:
                y = torch.nn.functional.pad(y, (0, 0, 0, pad))
                token_ids = torch.nn.functional.pad(token_ids, (0, pad), value=self.pad_id)
            tokens.append(token_ids)
            logits.append(y)
            if top_k:
                allowed.append(self._allowed(state, length))
        return evaluate(
            self.lm,
            [s.spec for s in states],
            self.stop_ids,
            torch.cat(tokens),
            torch.cat(logits) if with_grad else None,
            torch.cat(allowed) if top_k and with_grad else None,
            top_k=top_k,
        )

    def _decode_tokens(self, state: RequestState) -> Tensor:
        """Hard tokens of the current iterate: argmax of the logits (within the reference top-k when asked)."""
        if state.step <= 0:
            return state.initial_tokens
        if state.top_k is None:
            return state.logits.argmax(-1)
        candidates = state.top_k[..., : state.config.top_k]  # (C, L, k)
        best = state.logits.gather(-1, candidates).argmax(-1, keepdim=True)
        return candidates.gather(-1, best)[..., 0]

    def _allowed(self, state: RequestState, length: int) -> Tensor:
        """(C, length, V) mask of the tokens each position may take. Positions past this request's own length (padding
        up to a longer batch mate's) stay all allowed: an all-masked row's softmax is NaN, and NaN times a zero mask
        is still NaN in the reward."""
        allowed = torch.ones(state.chains, length, self.vocab, dtype=torch.bool, device=self.device)
        if state.config.top_k and state.top_k is not None:
            own = allowed[:, : state.spec.length]
            own.zero_()
            own.scatter_(-1, state.top_k[..., : state.config.top_k], True)
        return allowed

    def _update(self, state: RequestState) -> None:
        """One Langevin update of the logits: ``y ← y − step·direction + noise·ξ`` (direction: Adam or plain gradient)."""
        config = state.config
        grad = state.grad
        finite = torch.isfinite(grad).flatten(1).all(1)  # (C,); not read back: the device goes on without waiting
        grad = torch.where(finite[:, None, None], grad, 0.0)
        state.step += 1
        if config.optimizer == "adam":
            if state.adam_m is None:
                state.adam_m = torch.zeros_like(grad)
                state.adam_v = torch.zeros_like(grad)
            beta1, beta2 = ADAM_BETAS
            state.adam_m.mul_(beta1).add_(grad, alpha=1 - beta1)
            state.adam_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m_hat = state.adam_m / (1 - beta1**state.step)
            v_hat = state.adam_v / (1 - beta2**state.step)
            direction = m_hat / (v_hat.sqrt() + ADAM_EPS)
        else:
            direction = grad
        state.logits = state.logits - config.step_size * direction
        sigma = discrete.noise_at(config, state.step)
        if sigma > 0:
            noise = torch.randn(state.logits.shape, generator=state.generator, device=self.device)
            state.logits = state.logits + sigma * noise
        state.grad = None

    def _record(self, state: RequestState, evaluation: Evaluation, rows: slice, had_grad: bool) -> None:
        """Store the scores of the iterate just evaluated; track each chain's best; decide whether it is done."""
        config = state.config
        length = state.spec.length
        tokens = evaluation.tokens[rows, :length]
        mask = evaluation.mask[rows, :length]
        energy, reward, log_prob = evaluation.energy[rows], evaluation.reward[rows], evaluation.log_prob_ref[rows]
        passes = passes_per_row(state.spec) * state.chains
        state.usage.forward_token_passes += passes
        finite = torch.isfinite(energy)
        if had_grad:
            state.usage.backward_token_passes += passes
            state.grad = evaluation.grad[rows, :length]
            finite = finite & torch.isfinite(state.grad).flatten(1).all(1)
        if evaluation.ref_top_k is not None and config.top_k:
            state.top_k = evaluation.ref_top_k[rows, :length]
        state.tokens = tokens
        counted = mask.sum(1).clamp(min=1)
        changed = ((tokens != state.initial_tokens).float() * mask).sum(1) / counted
        first = state.step < 0
        improved = finite if first else finite & (energy < state.lowest_energy)
        better = improved if config.track_best else finite
        (figures,) = to_host(torch.stack([energy, reward, log_prob, changed, finite, improved], 1))  # one read per step
        stats = [StepStats(e, r, p, share, bool(ok)) for e, r, p, share, ok, _ in figures]
        if not all(stat.finite for stat in stats):
            state.nonfinite_steps += 1
        if first:
            state.step = 0
            state.initial = stats
            state.traces = [[] for _ in range(state.chains)]
            state.best_energy = state.lowest_energy = torch.where(finite, energy, torch.full_like(energy, math.inf))
            state.best_reward, state.best_log_prob = reward.clone(), log_prob.clone()
            state.best_tokens = tokens.clone()
            state.best_step = torch.zeros(state.chains, dtype=torch.long, device=self.device)
        else:
            for c in range(state.chains):
                state.traces[c].append(stats[c])
            if any(improved for *_, improved in figures):
                state.steps_since_improved = 0
            else:
                state.steps_since_improved += 1
            state.lowest_energy = torch.where(improved, energy, state.lowest_energy)
            state.best_energy = torch.where(better, energy, state.best_energy)
            state.best_reward = torch.where(better, reward, state.best_reward)
            state.best_log_prob = torch.where(better, log_prob, state.best_log_prob)
            state.best_tokens = torch.where(better[:, None], tokens, state.best_tokens)
            state.best_step = torch.where(better, torch.full_like(state.best_step, state.step), state.best_step)
        if state.step >= config.steps or (config.patience and state.steps_since_improved >= config.patience):
            state.done = True

    # ----- results -----------------------------------------------------------------------------

    def attach_token_log_probs(self, state: RequestState) -> None:
        """Give the best ``logprob_chains`` chains of a finished request that asked (``SEAConfig.logprobs``) each token's
        log-prob under the reference and its most likely tokens there: one pass over those chains from the cached
        prompt. Run apart from the step, so that a failure here (out of memory) is this request's alone. Counted in the
        request's usage (its tokens fed forward, as a scoring pass is) and total time."""
        config, result = state.config, state.result
        if config.logprobs is None or result is None:
            return
        started = time.perf_counter()
        chosen = ranked_chains(result.chains, result.chosen, config.logprob_chains, config.select)
        rows = [result.chains[index].tokens[: result.chains[index].counted] for index in chosen]
        width = max(len(row) for row in rows)
        if width == 0:
            return
        per_pass = rows_per_pass(1, state.spec.prefix.length, width)  # as bounded as a draw or a scoring pass (Best-of-256)
        for first in range(0, len(rows), per_pass):
            these = rows[first : first + per_pass]
            wide = max(len(row) for row in these)  # the pass's rows padded to its longest
            ids = torch.tensor([row + [self.pad_id] * (wide - len(row)) for row in these], device=self.device)
            picked, best, best_ids = to_host(*log_probs_with_top(self.lm.model, stack_prefixes([state.spec.prefix] * len(these)), ids,
                                                                 config.logprobs))
            for row, index in enumerate(chosen[first : first + per_pass]):
                result.chains[index].token_log_probs = [TokenLogProb(token, picked[row][t], list(zip(best_ids[row][t], best[row][t])))
                                                        for t, token in enumerate(these[row])]
            state.usage.forward_token_passes += len(these) * max(wide - 1, 0)  # what it feeds, padding too; the last token to nothing
        state.timings.total += time.perf_counter() - started

    def text_of(self, tokens: Tensor | list[int]) -> tuple[str, int, bool]:
        """Decoded text up to the first stop token, the number of tokens that count, and whether it stopped."""
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        stop = self.stop_set
        end = next((i for i, t in enumerate(ids) if t in stop), None)
        kept = ids if end is None else ids[:end]
        counted = len(ids) if end is None else end + 1
        return self.lm.tokenizer.decode(kept, skip_special_tokens=True), counted, end is not None

    def result(self, state: RequestState) -> AlignResult:
        """The request's result: each chain's best iterate; the returned one chosen by reward or energy."""
        config = state.config
        chains = []
        tokens, figures, best_step = to_host(state.best_tokens, torch.stack([state.best_reward, state.best_log_prob, state.best_energy], 1),
                                             state.best_step)
        for c in range(state.chains):
            text, counted, _ = self.text_of(tokens[c])
            reward, log_prob, energy = figures[c]
            chains.append(
                ChainResult(
                    text=text,
                    tokens=tokens[c],
                    reward=reward,
                    log_prob_ref=log_prob,
                    energy=energy,
                    best_step=best_step[c],
                    initial=state.initial[c],
                    trace=state.traces[c],
                    counted=counted,
                )
            )
        chosen = best_chain(chains, config.select)
        state.timings.steps = max(state.step, 0)
        return self.finish(state, chains, chosen, "sea")

    def finish(self, state: RequestState, chains: list[ChainResult], chosen: int, method: str) -> AlignResult:
        text, counted, stopped = self.text_of(chains[chosen].tokens)
        state.usage.completion_tokens = counted
        state.timings.total = time.perf_counter() - state.started
        if method != "sea":
            state.timings.init = state.timings.total  # a baseline's whole run is drawing and scoring: no steps
        best = chains[chosen]
        return AlignResult(
            method=method,
            text=text,
            reward=best.reward,
            log_prob_ref=best.log_prob_ref,
            energy=best.energy,
            energy_per_token=best.energy / max(counted, 1),
            chosen=chosen,
            chains=chains,
            usage=state.usage,
            timings=state.timings,
            finish_reason="stop" if stopped else "length",
            nonfinite_steps=state.nonfinite_steps,
            seed=state.seed,
        )
