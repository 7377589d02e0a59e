"""The discrete SEA update: start from the best of many samples, then gradient-ranked edits with exact acceptance.

Each tick, for every chain: (1) where the chain moved last tick, one forward/backward pass gives the
straight-through gradient ``dE/d one_hot(y)`` at its tokens; (2) :func:`proposals.propose` draws
``candidates`` edits from it; (3) all edits of all chains of all requests are scored exactly in one
batched forward pass; (4) a chain takes its best edit if that lowers its exact energy. The chain
never gets worse than its starting sample, and every energy reported is exact. A chain that has not
improved for ``restart_after`` steps is parked and costs nothing; once all are, steps draw fresh
samples that replace the worst chains they beat (restarts). The start and the restarts: ``starts.py``.

An edit leaves every position before its first edited one unchanged, so step (3) runs each edit only
from there on: the gradient pass of step (1) leaves the chain's keys/values and per-token log-probs
(its memory), and each edit reads its unchanged head from it (``reuse.py``). That about halves the cost of scoring.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from app.engine.energy import Abandoned, Evaluation, evaluate, evaluate_in_chunks, passes_per_row
from app.engine.host import to_host
from app.engine.proposals import apply, edit_scores, propose_chains, within_top_k
from app.engine.reuse import edit_starts, reuse_for_edits
from app.engine.starts import budget_left, restart, sample_cost, take
from app.engine.state import RequestState
from app.engine.types import StepStats, noise_at

if TYPE_CHECKING:
    from app.engine.sea import Engine


def active_chains(state: RequestState) -> list[int]:
    """The chains a step edits: all but those parked. With restarts on, a chain that has not improved for
    ``restart_after`` steps is parked (it costs nothing) until a restart replaces it or every chain is parked."""
    if not _restarts_on(state):
        return list(range(state.chains))
    return [c for c in range(state.chains) if state.stalls[c] < state.config.restart_after]


def affordable_chains(state: RequestState, chains: list[int]) -> list[int]:
    """The chains a step can edit within the compute budget: all of them when the budget allows, else as many as fit,
    cheapest first (a chain that moved last step needs a gradient pass, 3 passes, or for the gradient-free ablation
    a forward pass, before its edits) and, at equal cost, lowest energy first. Without this a run would end with up
    to one whole step's compute unspent: with 4 chains on a word-list reward at a 32-sample budget, up to half of it."""
    unit = passes_per_row(state.spec)
    refresh = 3 if state.config.proposal == "gradient" else 1
    cost = {c: unit * (refresh * (c in state.stale) + 1) for c in chains}  # a gradient (or table) pass where needed, one edit
    left = budget_left(state)
    if sum(cost.values()) <= left:
        return chains
    chosen = []
    energy = state.best_energy.tolist()
    for c in sorted(chains, key=lambda c: (cost[c], energy[c])):
        if cost[c] <= left:
            chosen.append(c)
            left -= cost[c]
    return sorted(chosen)


def tick(engine: Engine, states: list[RequestState]) -> None:
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


def _tick(engine: Engine, states: list[RequestState], saved: list, exhausted: list) -> None:
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
    replaced = restart(engine, restarting) if restarting else {}
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


def _plan(engine: Engine, states: list[RequestState], exhausted: list) -> tuple[list, list, dict[int, list[int]]]:
    """Split the states a step can afford into those that edit their chains and those that draw fresh samples
    (restarts), with the chains each editing state edits (by state id); the others go to ``exhausted``."""
    editing, restarting = [], []
    chains: dict[int, list[int]] = {}
    for state in states:
        restarts = _restarting(state)
        if restarts:
            needed = sample_cost(engine, state)  # one fresh sample
        else:
            unparked = active_chains(state)
            chains[id(state)] = affordable_chains(state, unparked)
            needed = math.inf if unparked and not chains[id(state)] else 0  # the chains chosen fit the budget by construction
        if budget_left(state) < needed:
            exhausted.append(state)  # not even one more step fits the compute budget
        else:
            (restarting if restarts else editing).append(state)
    return editing, restarting, chains


def _propose(engine: Engine, editing: list, chains: dict[int, list[int]]) -> tuple[list[list[int]], list[tuple]]:
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
            left = budget_left(state)
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


def _score_edits(engine: Engine, editing: list[RequestState], rows: list[list[int]], owners: list[tuple],
                 abandoned) -> tuple[Evaluation | None, list[int]]:
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


def _accept(states: list[RequestState], owners: list[tuple], scored: Evaluation | None, replaced: dict[int, set[int]]) -> None:
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
                take(state, c, scored, index, state.step)
                moved = True
            elif c not in fresh:
                state.stalls[c] += 1
        offset += state.chains
        if moved:
            state.steps_since_improved = 0
        else:
            state.steps_since_improved += 1


def _record_traces(states: list[RequestState]) -> None:
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


def _phrases(state: RequestState) -> list[list[tuple[int, ...]]]:
    """The multi-token words the request's reward pays for, when its proposals are gradient-ranked and it counts the
    reward (the ablations that drop either keep their plain moves)."""
    config = state.config
    if not (config.phrase_moves and config.proposal == "gradient" and config.use_reward and config.alpha > 0):
        return []
    return state.job.reward.phrases()


def _restarts_on(state: RequestState) -> bool:
    """Whether stalled chains are parked and restarted from fresh samples (a random start has none to draw)."""
    return bool(state.config.restart_after) and state.config.init != "random"


def _restarting(state: RequestState) -> bool:
    return _restarts_on(state) and state.steps_since_improved >= state.config.restart_after


def _finite_rows(grad: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Which rows of ``grad`` (rows × positions × vocabulary) are finite over their own ``lengths`` positions: the
    positions that only pad a shorter request up to its batch mates' length are never read, so they must not zero its
    gradient. A sum overflows only past 1e38."""
    per_position = grad.sum(2)
    if min(lengths) < grad.shape[1]:
        own = torch.arange(grad.shape[1], device=grad.device) < torch.tensor(lengths, device=grad.device)[:, None]
        per_position = per_position.masked_fill(~own, 0.0)
    return torch.isfinite(per_position.sum(1))


def _gradients(engine: Engine, needs: list) -> None:
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
