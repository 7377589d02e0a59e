"""The discrete SEA update: start from the best of many samples, then gradient-ranked edits with exact acceptance.

Each tick, for every chain: (1) where the chain moved last tick, one forward/backward pass gives the
straight-through gradient ``dE/d one_hot(y)`` at its tokens; (2) :func:`proposals.propose` draws
``candidates`` edits from it; (3) all edits of all chains of all requests are scored exactly in one
batched forward pass; (4) a chain takes its best edit if that lowers its exact energy. The chain
never gets worse than its starting sample, and every energy reported is exact. A chain that has not
improved for ``restart_after`` steps is parked and costs nothing; once all are, steps draw fresh
samples that replace the worst chains they beat (restarts).

An edit leaves every position before its first edited one unchanged, so step (3) runs each edit only
from there on: the gradient pass of step (1) leaves the chain's keys/values and per-token log-probs
(its memory), and each edit reads its unchanged head from it. That about halves the cost of scoring.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator

import torch

from app.engine.energy import (
    Abandoned,
    Evaluation,
    drawn_log_probs,
    drawn_scorers,
    evaluate,
    evaluate_in_chunks,
    passes_per_row,
    token_tilt,
)
from app.engine.host import to_host
from app.engine.proposals import apply, edit_scores, propose_chains, within_top_k
from app.engine.sampling import SampleGroup, Tilt, drawing_groups_in_chunks, run_for
from app.engine.types import StepStats, reward_pick
from models.lm import ResponseMemory, Reuse

# Token-passes that one more forward call is worth when edits are grouped by where their scoring starts
# (a call's fixed cost: reading every weight once, launching ~30 layers of kernels; on a CPU core about 30 token-passes).
CALL_OVERHEAD_PASSES = 32


def noise_at(config, step: int) -> float:
    """Noise (logit std or proposal temperature) at update ``step`` (1-based), annealed by the schedule."""
    if config.noise_schedule == "constant" or config.steps <= 1:
        return config.noise
    progress = (step - 1) / (config.steps - 1)
    if config.noise_schedule == "linear":
        return config.noise * (1.0 - progress)
    return config.noise * 0.5 * (1.0 + math.cos(math.pi * progress))


def starting(engine, states: list) -> Generator[None, None, None]:
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


def start_tilt(engine, state) -> Tilt | None:
    """What a state's starting samples are drawn by: the contrastive rewards' per-token tilt with ``init: guided``."""
    return token_tilt(state.spec, engine.lm.model, state.config.guide_top_k) if state.config.init == "guided" else None


@dataclasses.dataclass
class Drawn:
    """A state's drawn responses and the per-token log-probs the draw computed, by scorer (``evaluate``'s ``known``)."""

    tokens: torch.Tensor  # (n, L)
    known: dict[object, torch.Tensor]  # scorer -> (n, L)


def _draw_samples(engine, states: list, counts: list[int]) -> list[Drawn]:
    """:func:`_drawing_samples` run to its end (a restart's draw, inside a step)."""
    return run_for(_drawing_samples(engine, states, counts))[1]


def _drawing_samples(engine, states: list, counts: list[int], first: bool = False) -> Generator[None, None, list[Drawn]]:
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


def _score_drawn(engine, states: list, drawn: list[Drawn]) -> tuple[Evaluation, list[slice]]:
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


def _keep_best(engine, state, tokens, energy, reward, log_prob, mask) -> None:
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
    state.initial = [
        StepStats(float(state.best_energy[c]), float(state.best_reward[c]), float(state.best_log_prob[c]), 0.0,
                  bool(torch.isfinite(state.best_energy[c])))
        for c in range(chains)
    ]
    state.traces = [[] for _ in range(chains)]
    state.tried = [set() for _ in range(chains)]
    state.stalls = [0] * chains
    state.stale = set(range(chains))  # every chain needs a gradient pass
    state.step = 0
    state.done = state.config.steps == 0


def _start_rank(state, energy: torch.Tensor, log_prob: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """How samples compete for a chain (at the start and at restarts), lower first. Picking by energy: the energy.
    Picking by reward: the energy with the reference term taken per token over the whole ``max_tokens``, as if a
    sample that ends early went on as fluently; the energy sums over tokens, so a few-token fragment would otherwise
    start a chain for being short, and edits rarely change a chain's length. A new tensor: callers mark chains in it."""
    if state.config.select == "energy" or not state.config.use_reference:
        return energy.clone()
    rank = energy - (state.spec.length / counted.clamp(min=1) - 1) * log_prob
    return torch.where(torch.isfinite(rank), rank, torch.full_like(rank, math.inf))


def _left(state) -> float:
    """Compute (token-passes) the state may still spend (``Usage.budgeted``)."""
    limit = state.config.max_compute
    return math.inf if limit is None else limit - state.usage.budgeted


def shared_starts(first_edited: list[int], length: int, overhead: int = CALL_OVERHEAD_PASSES) -> list[int]:
    """The input position each edit's scoring pass starts at, for edits of responses of ``length`` tokens.

    An edit whose first edited position is ``t`` needs its inputs from ``max(t − 1, 0)`` on (the prediction of
    position t needs position t − 1's hidden state), and may start earlier. Edits with one start share a
    forward call, so they are grouped (by first edited position, into contiguous groups starting at each
    group's smallest need) to minimise the positions run plus ``overhead`` per group; an exact dynamic
    programme over the distinct needs.
    """
    needs = [max(t - 1, 0) for t in first_edited]
    values = sorted(set(needs))
    counts = [needs.count(v) for v in values]
    best = [0.0] + [math.inf] * len(values)  # best[j]: cost of grouping values[:j]
    cut = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # group values[i:j], starting at values[i]
            rows += counts[i]
            cost = best[i] + overhead + rows * (length - 1 - values[i])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    start_of: dict[int, int] = {}
    j = len(values)
    while j > 0:
        i = cut[j]
        for v in values[i:j]:
            start_of[v] = values[i]
        j = i
    return [start_of[n] for n in needs]


def _rows_by_state(owners: list) -> dict[int, list[int]]:
    """Per state (by id), the indices of its candidate rows (``owners[i] = (state, chain, move)``), in order."""
    rows: dict[int, list[int]] = {}
    for index, (state, _, _) in enumerate(owners):
        rows.setdefault(id(state), []).append(index)
    return rows


def edit_starts(states: list, owners: list) -> list[int]:
    """The input position each candidate row's scoring starts at (``owners[i] = (state, chain, move)``): per state, the
    starts are grouped from all its own edits at once, so what a request's scoring runs and costs depends neither on
    its batch nor on how the rows are cut into passes (0 for a state without memories: scored whole)."""
    starts = [0] * len(owners)
    per_state = _rows_by_state(owners)
    for state in states:
        indices = per_state.get(id(state), [])
        if indices and state.memories:
            for index, start in zip(indices, shared_starts([owners[i][2].position for i in indices], state.spec.length)):
                starts[index] = start
    return starts


def reuse_for_edits(states: list, owners: list, starts: list[int], length: int) -> Reuse | None:
    """The :class:`Reuse` of candidate rows (``owners[i] = (state, chain, move)``, padded to ``length`` tokens) that
    start at ``starts`` (:func:`edit_starts`): their chains' memories, built for these rows only."""
    if not any(starts):
        return None
    per_state = _rows_by_state(owners)
    keys: dict = {}
    for state in states:
        if per_state.get(id(state)) and state.memories:
            for key, memory in state.memories.items():
                keys.setdefault(key, memory)
    device = owners[0][0].tokens.device
    memories = {}
    for key, template in keys.items():
        parts = []
        for state in states:
            chains = torch.tensor([owners[i][1] for i in per_state.get(id(state), [])], dtype=torch.long, device=device)
            if not len(chains):
                continue
            memory = (state.memories or {}).get(key)
            parts.append(memory.rows(chains) if memory is not None else template.zeros_like(len(chains)))
        memories[key] = ResponseMemory.cat(parts).widened(length)  # as long as the rows, whoever brought them
    return Reuse(torch.tensor(starts, device=device), memories)


def active_chains(state) -> list[int]:
    """The chains a step edits: all but those parked. With restarts on, a chain that has not improved for
    ``restart_after`` steps is parked (it costs nothing) until a restart replaces it or every chain is parked."""
    if not _restarts_on(state):
        return list(range(state.chains))
    return [c for c in range(state.chains) if state.stalls[c] < state.config.restart_after]


def affordable_chains(state, chains: list[int]) -> list[int]:
    """The chains a step can edit within the compute budget: all of them when the budget allows, else as many as fit,
    cheapest first (a chain that moved last step needs a gradient pass, 3 passes, or for the gradient-free ablation
    a forward pass, before its edits) and, at equal cost, lowest energy first. Without this a run would end with up
    to one whole step's compute unspent: with 4 chains on a word-list reward at a 32-sample budget, up to half of it."""
    unit = passes_per_row(state.spec)
    refresh = 3 if state.config.proposal == "gradient" else 1
    cost = {c: unit * (refresh * (c in state.stale) + 1) for c in chains}  # a gradient (or table) pass where needed, one edit
    left = _left(state)
    if sum(cost.values()) <= left:
        return chains
    chosen = []
    energy = state.best_energy.tolist()
    for c in sorted(chains, key=lambda c: (cost[c], energy[c])):
        if cost[c] <= left:
            chosen.append(c)
            left -= cost[c]
    return sorted(chosen)


def tick(engine, states: list) -> None:
    """One step of every discrete state: gradients where needed, proposals, one exact batched scoring, acceptance.

    If it raises after the gradient pass (out of memory: the worker then retries the batch in halves), each state's
    usage and random generator are as they were after that pass, whose gradients are kept: the retry draws, charges
    and chooses as the step would have."""
    saved: list = []
    exhausted: list = []  # states not even one more step fits: done only once the step has run (a retry must see them)
    try:
        _tick(engine, states, saved, exhausted)
    except Abandoned:  # every request the step was scoring was abandoned: they end here; one out of budget ends done
        for state in states:
            if state in exhausted:
                state.done = True
            else:
                engine.cancel(state)
        return
    except BaseException:
        for state, usage, generator in saved:
            state.usage = usage
            state.generator.set_state(generator)
        raise
    for state in exhausted:
        state.done = True


def _tick(engine, states: list, saved: list, exhausted: list) -> None:
    editing, restarting, chains = _plan(engine, states, exhausted)
    states = [state for state in states if state not in exhausted]
    if not states:
        return
    stale = [(s, [c for c in chains[id(s)] if c in s.stale]) for s in editing]
    if any(c for _, c in stale):
        _gradients(engine, [(s, c) for s, c in stale if c])
    saved.extend((state, dataclasses.replace(state.usage), state.generator.get_state()) for state in states)
    rows, owners = _propose(engine, editing, chains)
    scored, starts = _score_edits(engine, editing, rows, owners, abandoned=lambda: all(s.job.is_abandoned() for s in states))
    # The last heavy work (the restarting states are not the editing ones): what follows is bookkeeping, so a step that
    # runs out of memory before here is retried by the worker as if it had not begun (see ``tick``).
    replaced = _restart(engine, restarting) if restarting else {}
    for (state, _, _), start in zip(owners, starts):
        state.usage.forward_token_passes += passes_per_row(state.spec, start)
    _accept(states, owners, scored, replaced)
    _record_traces(states)
    for state in states:
        no_moves = state.candidate_rows == 0
        if no_moves and _restarts_on(state):
            state.steps_since_improved = max(state.steps_since_improved, state.config.restart_after)  # nothing left to try: sample next
            no_moves = False
        if state.step >= state.config.steps or no_moves or (state.config.patience and state.steps_since_improved >= state.config.patience):
            state.done = True


def _plan(engine, states: list, exhausted: list) -> tuple[list, list, dict[int, list[int]]]:
    """Split the states a step can afford into those that edit their chains and those that draw fresh samples
    (restarts), with the chains each editing state edits (by state id); the others go to ``exhausted``."""
    editing, restarting = [], []
    chains: dict[int, list[int]] = {}
    for state in states:
        restarts = _restarting(state)
        if restarts:
            needed = _sample_cost(engine, state)  # one fresh sample
        else:
            unparked = active_chains(state)
            chains[id(state)] = affordable_chains(state, unparked)
            needed = math.inf if unparked and not chains[id(state)] else 0  # the chains chosen fit the budget by construction
        if _left(state) < needed:
            exhausted.append(state)  # not even one more step fits the compute budget
        else:
            (restarting if restarts else editing).append(state)
    return editing, restarting, chains


def _propose(engine, editing: list, chains: dict[int, list[int]]) -> tuple[list[list[int]], list[tuple]]:
    """Draw each editing state's edits of its chains: the candidate token rows (host lists) and, for each, its
    (state, chain, move); sets each state's ``candidate_rows``."""
    rows, owners = [], []
    proposing = [s for s in editing if chains[id(s)]]
    # Every proposing chain's tokens with its length last, in one read: edits are made on the host, sent back in one copy.
    chain_rows = dict(zip(map(id, proposing), to_host(*[torch.cat([s.tokens, s.counted[:, None]], 1) for s in proposing])))
    for state in editing:
        per_state = []
        edited = chains[id(state)]
        if edited:
            left = _left(state)
            cost = passes_per_row(state.spec) * len(edited)  # 0 for a one-token answer: its log-probs come from the prompts' passes
            affordable = state.config.candidates if math.isinf(left) or cost == 0 else int(left // cost)
            which = slice(None) if len(edited) == state.chains else torch.tensor(edited, device=state.tokens.device)
            tokens = state.tokens[which]
            scores = edit_scores(state.grad[which] if state.config.proposal == "gradient" else None,
                                 state.table[which] if state.config.proposal == "lm" else None, tokens)
            if state.config.top_k:
                scores = within_top_k(scores, state.top_k[which])
            held = [row[:-1] for row in chain_rows[id(state)]]  # each chain's tokens, on the host
            lengths = [row[-1] for row in chain_rows[id(state)]]
            drawn = propose_chains(scores, tokens, [lengths[c] for c in edited],
                                   min(state.config.candidates, affordable), noise_at(state.config, state.step + 1), state.generator,
                                   [state.tried[c] for c in edited], state.config.max_estimate, _phrases(state),
                                   [held[c] for c in edited])
            for c, moves in zip(edited, drawn):
                for move in moves:
                    candidate = apply(held[c], move)
                    if candidate == held[c]:  # no edit: a token inserted into a run of itself
                        state.tried[c].add(move)
                        continue
                    per_state.append(candidate)
                    owners.append((state, c, move))
        state.candidate_rows = len(per_state)
        rows.extend(per_state)
    return rows, owners


def _score_edits(engine, editing: list, rows: list[list[int]], owners: list[tuple], abandoned) -> tuple[Evaluation | None, list[int]]:
    """Exact scores of the candidate rows in batched passes, each row from its first edited position on, and those
    positions (none without rows)."""
    if not rows:
        return None, []
    specs = [dataclasses.replace(s.spec, rows=s.candidate_rows) for s in editing if s.candidate_rows]
    length = max(s.spec.length for s in editing if s.candidate_rows)  # a longer request without edits pads nothing
    padded = [row + [engine.pad_id] * (length - len(row)) for row in rows]
    starts = edit_starts(editing, owners)

    def reuse_of(rows_here: list[int]):  # the memories of a pass's rows only (a whole batch's may not fit)
        return reuse_for_edits(editing, [owners[i] for i in rows_here], [starts[i] for i in rows_here], length)

    with torch.no_grad():
        scored = evaluate_in_chunks(engine.lm, specs, engine.stop_ids, torch.tensor(padded, device=engine.device), reuse_of=reuse_of,
                                    abandoned=abandoned)
    return scored, starts


def _accept(states: list, owners: list[tuple], scored: Evaluation | None, replaced: dict[int, set[int]]) -> None:
    """Each chain takes its best candidate if that beats its best energy so far; advance every state's step and its
    stall counts (a chain a restart ``replaced`` has not stalled)."""
    # The candidates' energies and every chain's best so far, in one read from the device.
    read = to_host(*([scored.energy] if owners else []), torch.cat([s.best_energy for s in states]))
    energies, best_so_far = read if owners else ([], read[0])
    best: dict[tuple[int, int], tuple[float, int]] = {}
    for index, (state, c, move) in enumerate(owners):
        energy = energies[index]
        state.tried[c].add(move)
        key = (id(state), c)
        if math.isfinite(energy) and energy < best.get(key, (math.inf, -1))[0]:
            best[key] = (energy, index)
    offset = 0
    for state in states:
        state.step += 1
        fresh = replaced.get(id(state), set())
        moved = bool(fresh)
        for c in range(state.chains):
            energy, index = best.get((id(state), c), (math.inf, -1))
            if index >= 0 and energy < best_so_far[offset + c] - 1e-6:
                _take(state, c, scored, index, state.step)
                moved = True
            elif c not in fresh:
                state.stalls[c] += 1
        offset += state.chains
        if moved:
            state.steps_since_improved = 0
        else:
            state.steps_since_improved += 1


def _record_traces(states: list) -> None:
    """Append every chain's step figures (best energy, reward, log pi_ref, share of tokens changed since its start) to
    its trace, read from the device in one copy for all states."""
    figures = []
    for state in states:
        counted = state.counted.clamp(min=1)
        within = torch.arange(state.spec.length, device=counted.device)[None, :] < counted[:, None]
        changed = ((state.tokens != state.initial_tokens) & within).sum(1) / counted
        figures.append(torch.stack([state.best_energy, state.best_reward, state.best_log_prob, changed.to(state.best_energy.dtype)], 1))
    (per_chain,) = to_host(torch.cat(figures))
    offset = 0
    for state in states:
        for c in range(state.chains):
            energy, reward, log_prob, changed = per_chain[offset + c]
            state.traces[c].append(StepStats(energy, reward, log_prob, changed, math.isfinite(energy)))
        offset += state.chains


def _phrases(state) -> list[list[tuple[int, ...]]]:
    """The multi-token words the request's reward pays for, when its proposals are gradient-ranked and it counts the
    reward (the ablations that drop either keep their plain moves)."""
    config = state.config
    if not (config.phrase_moves and config.proposal == "gradient" and config.use_reward and config.alpha > 0):
        return []
    return state.job.reward.phrases()


def _take(state, chain: int, scored, index: int, step: int) -> None:
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


def _restarts_on(state) -> bool:
    """Whether stalled chains are parked and restarted from fresh samples (a random start has none to draw)."""
    return bool(state.config.restart_after) and state.config.init != "random"


def _restarting(state) -> bool:
    return _restarts_on(state) and state.steps_since_improved >= state.config.restart_after


def _sample_cost(engine, state) -> int:
    """Token-passes of drawing one sample (it feeds back L − 1 tokens; a guided one runs them under each guide prompt
    too) and scoring what the draw did not."""
    tilt = start_tilt(engine, state)
    drawn = (state.spec.length - 1) * (1 + (len(tilt.guides) if tilt else 0))
    return max(1, drawn + passes_per_row(state.spec, known=drawn_scorers(tilt)))  # at least 1: one-token answers cost ~0


def _restart(engine, states: list) -> dict[int, set[int]]:
    """Draw ``2 × chains`` fresh samples per stalled state (as its start drew them; as many as its budget allows),
    score them in one batch, and let each, best first, replace the state's worst chain if it beats it. Returns,
    per state id, the chains replaced."""
    counts = [min(2 * s.chains, int(_left(s) // _sample_cost(engine, s))) if math.isfinite(_left(s)) else 2 * s.chains for s in states]
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
                _take(state, worst, scored, rows.start + own, state.step + 1)
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


def _finite_rows(grad: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Which rows of ``grad`` (rows × positions × vocabulary) are finite over their own ``lengths`` positions: the
    positions that only pad a shorter request up to its batch mates' length are never read, so they must not zero its
    gradient. A sum overflows only past 1e38."""
    per_position = grad.sum(2)
    if min(lengths) < grad.shape[1]:
        own = torch.arange(grad.shape[1], device=grad.device) < torch.tensor(lengths, device=grad.device)[:, None]
        per_position = per_position.masked_fill(~own, 0.0)
    return torch.isfinite(per_position.sum(1))


def _gradients(engine, needs: list) -> None:
    """dE/d one_hot at the tokens of the given chains (``needs``: (state, chains) pairs), in one batched pass, with
    their memories (or, for the gradient-free ablation, the LM's log-prob table); the other chains keep theirs."""
    states = [state for state, _ in needs]
    length = max(s.spec.length for s in states)
    pad = engine.pad_id
    tokens = torch.cat([torch.nn.functional.pad(s.tokens[chains], (0, length - s.spec.length), value=pad) for s, chains in needs])
    specs = [dataclasses.replace(s.spec, rows=len(chains)) for s, chains in needs]
    with_grad = any(s.config.proposal == "gradient" for s in states)
    top_k = max((s.config.top_k or 0) for s in states) or None
    with torch.set_grad_enabled(with_grad):
        scored = evaluate(engine.lm, specs, engine.stop_ids, tokens, one_hot_grad=with_grad,
                          keep_table=any(s.config.proposal == "lm" for s in states), top_k=top_k, record=True)
    finite = _finite_rows(scored.grad, [s.spec.length for s, chains in needs for _ in chains]) if scored.grad is not None else None
    (finite_rows,) = to_host(finite) if finite is not None else (None,)
    offset = 0
    for state, chains in needs:
        rows = slice(offset, offset + len(chains))
        offset += len(chains)
        own = state.spec.length
        device = state.tokens.device
        every = len(chains) == state.chains  # an arange is made on the device; a list is copied there
        index = torch.arange(state.chains, device=device) if every else torch.tensor(chains, dtype=torch.long, device=device)
        passes = passes_per_row(state.spec) * len(chains)
        state.usage.forward_token_passes += passes
        grad = None  # the gradient-free ablation has none: the table drives its proposals
        if state.config.proposal == "gradient":  # not with_grad: an LM-ranked request's usage must not depend on its batch mates
            state.usage.backward_token_passes += passes
            grad = scored.grad[rows, :own]
            if not all(finite_rows[rows]):
                state.nonfinite_steps += 1
                grad = torch.where(finite[rows, None, None], grad, torch.zeros_like(grad))
        if grad is not None:
            if every:
                state.grad = grad
            else:
                if state.grad is None:
                    state.grad = grad.new_zeros(state.chains, *grad.shape[1:])
                state.grad.index_copy_(0, index, grad)
        if state.config.top_k:
            top = scored.ref_top_k[rows, :own, : state.config.top_k]
            if state.top_k is None:
                state.top_k = top.new_zeros(state.chains, *top.shape[1:])
            state.top_k.index_copy_(0, index, top)
        if scored.table is not None and state.table is None:
            state.table = scored.table.new_zeros(state.chains, own, scored.table.shape[-1])
        if state.memories is None:
            state.memories = {}
        if scored.table is not None and state.table is not None:
            state.table.index_copy_(0, index, scored.table[rows, :own])
        for key, memory in scored.memories.items():  # a batch mate may bring a scorer this state lacks: zeros, never read
            mine = memory.rows(rows).trimmed(own)
            state.memories.setdefault(key, mine.zeros_like(state.chains)).put_rows(index, mine)
        state.stale.difference_update(chains)
