"""A discrete SEA run's samples: the start (many samples drawn and scored exactly, the best ``chains`` kept) and the
restarts (fresh samples that replace a stalled run's worst chains they beat).

Both draw in one batch for every state started or restarting together, each state from its own generator, and read
the log-probs the draw computed rather than run the samples again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator
from typing import TYPE_CHECKING

import torch

from app.engine.energy import (
    Evaluation,
    draw_cost,
    drawn_log_probs,
    drawn_scorers,
    evaluate_in_chunks,
    passes_per_row,
    token_tilt,
)
from app.engine.host import to_host
from app.engine.sampling import SampleGroup, Tilt, drawing_groups_in_chunks, run_for
from app.engine.state import RequestState
from app.engine.types import StepStats, reward_pick

if TYPE_CHECKING:
    from app.engine.sea import Engine


def starting(engine: Engine, states: list[RequestState]) -> Generator[None, None, None]:
    """Draw the initial samples of every state, score them exactly, and keep each state's best ``chains`` (by
    ``_start_rank``); a generator that pauses after each drawn token and before the scoring pass.

    States started together sample in one batch and are scored in one batched pass; each draws from its own
    generator, so a seeded request starts the same alone or beside others. The draw's own log-probs score what
    they can (the reference's, and a guided draw's guide prompts'), so a drawn sample is not run twice.
    """
    drawn: dict[int, Drawn] = {}
    sampled = [s for s in states if s.config.init != "random"]
    if sampled:
        counts = [max(s.config.init_samples or 2 * s.chains, s.chains) for s in sampled]
        for state, samples in zip(sampled, (yield from _drawing_samples(engine, sampled, counts, first=True))):
            drawn[id(state)] = samples
    for state in states:
        if state.config.init == "random":
            shape = (state.chains, state.config.max_tokens)
            drawn[id(state)] = Drawn(torch.randint(0, engine.vocab, shape, generator=state.generator, device=engine.device), {})
    for state in states:
        if state.job.is_abandoned():
            engine.cancel(state)  # its draw stopped early; nobody waits for its scores
    states = [s for s in states if not s.cancelled]
    if not states:
        return
    yield
    states = [s for s in states if not s.cancelled]  # (cancelled during the pause)
    if not states:
        return
    scored, slices = _score_drawn(engine, states, [drawn[id(s)] for s in states])
    for state, rows in zip(states, slices):
        length = state.spec.length
        _keep_best(engine, state, scored.tokens[rows, :length], scored.energy[rows], scored.reward[rows],
                   scored.log_prob_ref[rows], scored.mask[rows, :length])


def start_tilt(engine: Engine, state: RequestState) -> Tilt | None:
    """What a state's starting samples are drawn by: the contrastive rewards' per-token tilt with ``init: guided``."""
    return token_tilt(state.spec, engine.lm.model, state.config.guide_top_k) if state.config.init == "guided" else None


@dataclasses.dataclass
class Drawn:
    """A state's drawn responses and the per-token log-probs the draw computed, by scorer (``evaluate``'s ``known``)."""

    tokens: torch.Tensor  # (n, L)
    known: dict[object, torch.Tensor]  # scorer -> (n, L)


def _draw_samples(engine: Engine, states: list[RequestState], counts: list[int]) -> list[Drawn]:
    """:func:`_drawing_samples` run to its end (a restart's draw, inside a step)."""
    return run_for(_drawing_samples(engine, states, counts))[1]


def _drawing_samples(engine: Engine, states: list[RequestState], counts: list[int],
                     first: bool = False) -> Generator[None, None, list[Drawn]]:
    """``counts[i]`` samples ``(n, L)`` for each of ``states`` (base samples, or guided ones: see ``SEAConfig.init``),
    drawn in one batch, each state from its own generator (so alone or beside others it draws the same); the
    drawing is counted in each state's usage. A guided state's ``first`` draw includes the tilted policy's greedy
    decode (which, for a contrastive reward, is ARGS's answer unless that answer completes a copy of the reward's
    prompt: ARGS then also takes back the copied run's earlier tokens), so SEA starts no worse than that."""
    groups, tilts = [], []
    for state, n in zip(states, counts):
        tilts.append(start_tilt(engine, state))
        groups.append(SampleGroup(state.spec.prefix, n, state.spec.length, state.generator, state.config.temperature,
                                  state.config.top_p, tilts[-1], greedy_rows=int(first and tilts[-1] is not None),
                                  abandoned=state.job.is_abandoned))
    drawn = []
    for state, tilt, samples in zip(states, tilts, (yield from drawing_groups_in_chunks(engine.lm.model, groups, engine.stop_ids))):
        state.usage.forward_token_passes += samples.forward_token_passes
        drawn.append(Drawn(samples.tokens, drawn_log_probs(samples.token_log_probs, tilt)))
    return drawn


def _score_drawn(engine: Engine, states: list[RequestState], drawn: list[Drawn]) -> tuple[Evaluation, list[slice]]:
    """Score every state's drawn responses exactly, counted in each state's usage: the log-probs their draw
    computed are read, not recomputed; states that know the same scorers are scored in one batched pass.

    Returns the evaluation (rows state after state) and each state's rows in it.
    """
    length = max(s.spec.length for s in states)
    pad = engine.pad_id
    slices, offset = [], 0
    for d in drawn:
        slices.append(slice(offset, offset + d.tokens.shape[0]))
        offset += d.tokens.shape[0]
    rows = offset
    device = drawn[0].tokens.device
    tokens = torch.full((rows, length), pad, dtype=torch.long, device=device)
    mask = torch.zeros(rows, length, device=device)
    energy, reward, log_prob = (torch.zeros(rows, device=device) for _ in range(3))
    by_known: dict[frozenset, list[int]] = {}
    for i, d in enumerate(drawn):
        by_known.setdefault(frozenset(d.known), []).append(i)
    for keys, members in by_known.items():
        specs = [dataclasses.replace(states[i].spec, rows=drawn[i].tokens.shape[0]) for i in members]
        batch = torch.cat([torch.nn.functional.pad(drawn[i].tokens, (0, length - drawn[i].tokens.shape[1]), value=pad) for i in members])
        known = {key: torch.cat([torch.nn.functional.pad(drawn[i].known[key], (0, length - drawn[i].tokens.shape[1])) for i in members])
                 for key in keys}
        with torch.no_grad():
            scored = evaluate_in_chunks(engine.lm, specs, engine.stop_ids, batch, known=known)
        index = torch.cat([torch.arange(slices[i].start, slices[i].stop, device=device) for i in members])
        tokens[index], mask[index] = scored.tokens, scored.mask
        energy[index], reward[index], log_prob[index] = scored.energy, scored.reward, scored.log_prob_ref
        for i, spec in zip(members, specs):
            states[i].usage.forward_token_passes += passes_per_row(spec, known=keys) * spec.rows
    return Evaluation(tokens, mask, energy, reward, log_prob, None, None, None), slices


def _keep_best(engine: Engine, state: RequestState, tokens, energy, reward, log_prob, mask) -> None:
    """Make the ``chains`` best rows of the scored initial samples (by :func:`_start_rank`) the state's chains."""
    chains = state.chains
    energy = torch.where(torch.isfinite(energy), energy, torch.full_like(energy, math.inf))
    keep = torch.argsort(_start_rank(state, energy, log_prob, mask.sum(1)))[:chains]
    state.tokens = tokens[keep].clone()
    state.initial_tokens = state.tokens.clone()
    state.best_tokens = state.tokens.clone()
    state.best_energy = energy[keep].clone()
    state.best_reward = reward[keep].clone()
    state.best_log_prob = log_prob[keep].clone()
    state.best_step = torch.zeros(chains, dtype=torch.long, device=engine.device)
    state.counted = mask[keep].sum(1).long()
    energies, rewards, log_probs = to_host(state.best_energy, state.best_reward, state.best_log_prob)  # one read
    state.initial = [StepStats(e, r, lp, 0.0, math.isfinite(e)) for e, r, lp in zip(energies, rewards, log_probs)]
    state.traces = [[] for _ in range(chains)]
    state.tried = [set() for _ in range(chains)]
    state.stalls = [0] * chains
    state.stale = set(range(chains))  # every chain needs a gradient pass
    state.step = 0
    state.done = state.config.steps == 0


def _start_rank(state: RequestState, energy: torch.Tensor, log_prob: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """How samples compete for a chain (at the start and at restarts), lower first. Picking by energy: the energy.
    Picking by reward: the energy with the reference term taken per token over the whole ``max_tokens``, as if a
    sample that ends early went on as fluently; the energy sums over tokens, so a few-token fragment would otherwise
    start a chain for being short, and edits rarely change a chain's length. A new tensor: callers mark chains in it."""
    if state.config.select == "energy" or not state.config.use_reference:
        return energy.clone()
    rank = energy - (state.spec.length / counted.clamp(min=1) - 1) * log_prob
    return torch.where(torch.isfinite(rank), rank, torch.full_like(rank, math.inf))


def budget_left(state: RequestState) -> float:
    """Compute (token-passes) the state may still spend (``Usage.budgeted``)."""
    limit = state.config.max_compute
    return math.inf if limit is None else limit - state.usage.budgeted


def take(state: RequestState, chain: int, scored, index: int, step: int) -> None:
    """Make scored row ``index`` chain ``chain``'s tokens (and best iterate) from ``step`` on."""
    length = state.spec.length
    state.tokens[chain] = scored.tokens[index, :length]
    state.best_tokens[chain] = state.tokens[chain]
    state.best_energy[chain] = scored.energy[index]
    state.best_reward[chain] = scored.reward[index]
    state.best_log_prob[chain] = scored.log_prob_ref[index]
    state.best_step[chain] = step
    state.counted[chain] = scored.mask[index, :length].sum()
    state.tried[chain] = set()
    state.stalls[chain] = 0
    state.stale.add(chain)  # its gradient and memory are of its old tokens


def sample_cost(engine: Engine, state: RequestState) -> int:
    """Token-passes of drawing one sample (it feeds back L − 1 tokens; a guided one runs them under each guide prompt
    too) and scoring what the draw did not."""
    tilt = start_tilt(engine, state)
    cost = draw_cost(state.spec.length, len(tilt.guides) if tilt else 0, passes_per_row(state.spec, known=drawn_scorers(tilt)))
    return max(1, cost)  # at least 1: one-token answers cost ~0


def restart(engine: Engine, states: list[RequestState]) -> dict[int, set[int]]:
    """Draw ``2 × chains`` fresh samples per stalled state (as its start drew them; as many as its budget allows),
    score them in one batch, and let each, best first, replace the state's worst chain if it beats it. Returns,
    per state id, the chains replaced."""
    counts = [min(2 * s.chains, int(budget_left(s) // sample_cost(engine, s))) if math.isfinite(budget_left(s)) else 2 * s.chains for s in states]
    drawn = _draw_samples(engine, states, counts)
    for state in states:
        if state.job.is_abandoned():
            engine.cancel(state)  # its draw stopped early: the cut samples' scores would not be exact, and nobody waits
    kept = [(state, d) for state, d in zip(states, drawn) if not state.cancelled]
    if not kept:
        return {}
    states, drawn = [state for state, _ in kept], [d for _, d in kept]
    scored, slices = _score_drawn(engine, states, drawn)
    energies = torch.where(torch.isfinite(scored.energy), scored.energy, torch.full_like(scored.energy, math.inf))
    replaced: dict[int, set[int]] = {}
    for state, rows in zip(states, slices):
        state.candidate_rows = rows.stop - rows.start
        counts = scored.mask[rows].sum(1)
        ranks = _start_rank(state, energies[rows], scored.log_prob_ref[rows], counts)
        # A sample a chain already holds replaces nothing (float noise in its score could otherwise "improve" on it):
        # which samples a chain holds now, and which samples are the same (one taken below is held from then on).
        samples = scored.tokens[rows, : state.spec.length]
        # The choice runs on the host, from one read of the samples' figures and the chains'.
        order, rank, energy, reward, log_prob, count, held_now, same_as, chain_figures = to_host(
            torch.argsort(ranks), ranks, scored.energy[rows], scored.reward[rows], scored.log_prob_ref[rows], counts,
            (samples[:, None] == state.tokens[None]).all(-1).any(-1), (samples[:, None] == samples[None]).all(-1),
            torch.stack([state.best_energy, state.best_reward, state.best_log_prob, state.counted.to(state.best_energy.dtype)]))
        chain_energy, chain_reward, chain_log_prob, chain_counted = chain_figures
        taken: list[int] = []
        for own in order:
            if held_now[own] or any(same_as[own][other] for other in taken):
                continue
            current = _start_rank(state, torch.tensor(chain_energy), torch.tensor(chain_log_prob), torch.tensor(chain_counted))
            if state.config.select == "reward":  # the chain the pick would return goes only for a sample it prefers
                kept = max(range(state.chains), key=lambda c: _pick_key(chain_figures, c))
                if reward_pick(reward[own], log_prob[own], int(count[own])) <= _pick_key(chain_figures, kept):
                    current[kept] = -math.inf
            worst = int(torch.argmax(current))
            if rank[own] < _less_noise(float(current[worst])):
                take(state, worst, scored, rows.start + own, state.step + 1)
                state.initial_tokens[worst] = state.tokens[worst]  # the chain starts again from this sample
                state.initial[worst] = StepStats(energy[own], reward[own], log_prob[own], 0.0, True)
                chain_energy[worst], chain_reward[worst], chain_log_prob[worst] = energy[own], reward[own], log_prob[own]
                chain_counted[worst] = count[own]
                replaced.setdefault(id(state), set()).add(worst)
                taken.append(own)
    return replaced


def _less_noise(value: float) -> float:
    """``value`` less what float32 noise may put on a score of its size: a rank must beat it by more to count as better."""
    return value - 1e-5 * max(1.0, abs(value)) if math.isfinite(value) else value


def _pick_key(chain_figures: list[list[float]], c: int) -> tuple[float, float]:
    """Chain ``c``'s :func:`reward_pick` key from the chains' host figures (energies, rewards, log-probs, lengths); a chain
    whose energy is not finite is never the pick, so it is not kept from a sample either."""
    energy, reward, log_prob, counted = (figures[c] for figures in chain_figures)
    return reward_pick(reward, log_prob, int(counted)) if math.isfinite(energy) else (-math.inf, -math.inf)
