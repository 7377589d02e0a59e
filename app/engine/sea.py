"""The SEA engine: requests start, step and finish here, batched over requests, on one reference LM.

A request becomes a :class:`RequestState` (``Engine.start``: prompt keys/values, reward contexts,
initial chains from the base policy). ``Engine.tick`` advances every state in a list by one step,
batched, so requests can join and leave a running batch between ticks. The discrete update (the
default: ``discrete.py``, its start and restarts in ``starts.py``) scores its initial chains at the start and edits
them each tick; the paper-literal logits update (``logits.py``) scores its initial chains at tick 0, and tick k applies
the k-th Langevin update of the logits and scores the new iterate. Baselines run as generators that ``Engine.advance``
resumes.
"""

from __future__ import annotations

import math
import time

import torch

from app.engine import discrete, logits, starts
from app.engine.energy import RowSpec
from app.engine.host import to_host
from app.engine.sampling import rows_per_pass, run_for
from app.engine.state import RequestState, Starting
from app.engine.types import (
    MAX_DRAWN_SEED,
    AlignJob,
    AlignResult,
    ChainResult,
    Timings,
    TokenLogProb,
    Usage,
    best_chain,
    ranked_chains,
)
from models.kv import Prefix, stack_prefixes
from models.lm import encode_prefix, log_probs_with_top
from models.loading import LoadedLM
from models.tokens import TokenText, stop_token_ids


class Engine:
    """Runs SEA and the sampling baselines on one reference LM. Not thread-safe: one worker owns it."""

    def __init__(self, lm: LoadedLM):
        self.lm = lm
        self.device = lm.device
        self.use_stop_ids(stop_token_ids(lm.tokenizer, lm.model))
        self.vocab = lm.model.get_output_embeddings().weight.shape[0]

    def use_stop_ids(self, ids: list[int]) -> None:
        """The token ids that end a response, on the device and on the host (``text.stop_ids``: each read of a device
        tensor waits for the device): the first also pads shorter responses in a batch."""
        self.stop_ids = torch.tensor(ids, device=self.device)
        self.pad_id = ids[0]
        self.text = TokenText(self.lm.tokenizer, frozenset(ids))

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
                logits.start(self, state)
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

    def cancel(self, state: RequestState) -> None:
        """End a request without a result: it is done, a baseline's run is closed, and a start that draws for nobody
        else stops."""
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
        if rest := [s for s in states if s.config.update != "discrete"]:
            logits.tick(self, rest)

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

    def result(self, state: RequestState) -> AlignResult:
        """The request's result: each chain's best iterate; the returned one chosen by reward or energy."""
        config = state.config
        chains = []
        tokens, figures, best_step = to_host(state.best_tokens, torch.stack([state.best_reward, state.best_log_prob, state.best_energy], 1),
                                             state.best_step)
        for c in range(state.chains):
            text, counted, _ = self.text.response(tokens[c])
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
        """The request's result from its chains (best iterates) and the one returned: its text up to the stop token,
        the tokens it counts, its timings and usage."""
        text, counted, stopped = self.text.response(chains[chosen].tokens)
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
