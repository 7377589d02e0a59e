"""Scoring edits from their chains' memories: an edit leaves every position before its first edited one unchanged, so
its scoring pass runs from there on and reads the unchanged head's keys/values and log-probs from the memory the chain's
gradient pass left. Which position each edit starts at is planned per request, so what a request's scoring runs and
costs does not depend on its batch.
"""

from __future__ import annotations

import math

import torch

from app.engine.state import RequestState
from models.kv import ResponseMemory, Reuse

# Token-passes that one more forward call is worth when edits are grouped by where their scoring starts
# (a call's fixed cost: reading every weight once, launching ~30 layers of kernels; on a CPU core about 30 token-passes).
CALL_OVERHEAD_PASSES = 32


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


def edit_starts(states: list[RequestState], owners: list) -> list[int]:
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


def reuse_for_edits(states: list[RequestState], owners: list, starts: list[int], length: int) -> Reuse | None:
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
