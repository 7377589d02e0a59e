"""Gradient-informed discrete proposals for SEA (the default update).

A paper-literal Langevin step moves all L×V logits at once, so many positions flip together and the
straight-through linearisation stops holding (see docs/quality.md). Here the chain state is the hard
tokens, and a step is a discrete Langevin proposal (Zhang et al., ICML 2022, "A Langevin-like
Sampler for Discrete Distributions"): the straight-through gradient ``G = dE/d one_hot(y)`` gives the
first-order energy change of every single-token edit, ``Δ(t, v) = G[t, v] − G[t, y_t]``; edits are
drawn by ``Δ`` with Gumbel noise (temperature = the Langevin noise), evaluated *exactly* in one
batched forward pass, and the best is accepted only if it lowers the exact energy. Moves: swaps,
pairs of adjacent swaps (so a two-token word can appear in one move), and insertions (a word can be
added without overwriting its neighbour).

A reward may name token sequences it pays for as a whole (a word-list reward: each word's multi-token
spellings). No single-token edit can bring such a word in: under the straight-through gradient each of its
tokens gains only when the others already stand beside it, so the first-order ranking never puts its pieces
together. For each one missing from a chain, a phrase move writes it (or inserts it) whole where the gradient
estimates it costs least; like every move, it is accepted only if the exact energy drops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from app.engine.host import to_host

EDITS_PER_POSITION = 64  # the edits per position, best first by their estimate, that a proposal draws among


@dataclass(frozen=True)
class Move:
    kind: str  # "swap", "pair", "insert" (its tokens pushed in before position), or "phrase" (its tokens written from position)
    position: int
    tokens: tuple[int, ...]
    estimate: float  # first-order energy change (nats; lower is better)


def edit_scores(grad: Tensor | None, table: Tensor | None, tokens: Tensor) -> Tensor:
    """First-order energy change of putting token v at position t: ``(..., L, V)`` for tokens ``(..., L)``.

    With ``grad`` (dE/d one-hot) this is ``G[t, v] − G[t, y_t]``: the exact change of the position's
    own log-prob plus the linearised change of every later term and of the reward. Without it (the
    gradient-free ablation) only the reference LM's own term is used: ``−(log p[t, v] − log p[t, y_t])``.
    """
    if grad is not None:
        return grad - grad.gather(-1, tokens[..., None])
    return -(table - table.gather(-1, tokens[..., None]))


def within_top_k(scores: Tensor, top: Tensor) -> Tensor:
    """``scores`` (..., L, V) with every token outside ``top`` (..., L, k), the reference's top-k at each position,
    ruled out (+inf: never proposed)."""
    allowed = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return scores.masked_fill(~allowed, math.inf)


def propose(
    scores: Tensor,
    tokens: Tensor,
    counted: int,
    budget: int,
    temperature: float,
    generator: torch.Generator,
    tried: set[Move],
    max_estimate: float = math.inf,
    phrases: list[list[tuple[int, ...]]] = (),
) -> list[Move]:
    """Up to ``budget`` distinct untried moves of one chain: :func:`propose_chains` for a single chain."""
    return propose_chains(scores[None], tokens[None], [counted], budget, temperature, generator, [tried], max_estimate, phrases)[0]


def propose_chains(
    scores: Tensor,
    tokens: Tensor,
    counted: list[int],
    budget: int,
    temperature: float,
    generator: torch.Generator,
    tried: list[set[Move]],
    max_estimate: float = math.inf,
    phrases: list[list[tuple[int, ...]]] = (),
    rows: list[list[int]] | None = None,
) -> list[list[Move]]:
    """Per chain, up to ``budget`` distinct untried moves, drawn by estimated gain with Gumbel noise.

    ``scores`` (C, L, V) from :func:`edit_scores`, ``tokens`` (C, L); chain c's first ``counted[c]`` positions take
    part (up to its first stop). The noise and the ranking run on all chains at once; only picking moves out of each
    chain's short ranked lists is per chain. Moves whose first-order estimate is above ``max_estimate`` nats are
    not worth an exact evaluation. About half the budget goes to single swaps, a quarter to adjacent pairs and a
    quarter to insertions; with ``phrases`` (per rewarded word, its spellings of two or more tokens), a quarter first
    to writing or inserting a missing word whole (:func:`phrase_moves`). ``rows``: ``tokens`` as host lists, if the
    caller has them (else read from the device when phrases need them).
    """
    chains, length, vocab = scores.shape
    spans = [max(1, min(n, length)) for n in counted]
    span = max(spans)
    pool = 4 * budget + max(len(t) for t in tried)  # enough ranked swaps to skip those already tried
    # Only each position's best edits by estimate get noise: drawing an exponential for each of the L×V entries was
    # most of a proposal's time on a CPU, and at the noise's small temperature an edit outside them almost never wins.
    width = min(vocab, max(EDITS_PER_POSITION, pool))
    estimates, edits = torch.topk(scores[:, :span], width, dim=-1, largest=False)  # (C, span, width)
    beyond = torch.arange(span, device=scores.device)[None, :] >= torch.tensor(spans, device=scores.device)[:, None]
    no_move = (edits == tokens[:, :span, None]) | beyond[..., None]  # "change" to the same token; after a chain's stop
    estimates = estimates.masked_fill(no_move, math.inf)
    if temperature > 0:
        # estimate − temperature·Gumbel, with Gumbel = −log(Exponential(1)): lower is better
        noise = torch.empty_like(estimates).exponential_(generator=generator).clamp_min_(torch.finfo(estimates.dtype).tiny)
        noisy = noise.log_().mul_(temperature).add_(estimates)
    else:
        noisy = estimates
    ranked = torch.topk(noisy.flatten(1), min(pool, span * width), largest=False).indices  # (C, pool) into (span, width)
    best_value, best = noisy.min(-1)  # (C, span)
    pair_sums = best_value[:, :-1] + best_value[:, 1:] if span > 1 else best_value[:, :0]
    # The ranked lists, read back to the host at once (on a GPU each read waits for the device to finish).
    swap_estimates, swap_tokens, swap_positions, best_token, exact_best, pair_order, insert_order = to_host(
        estimates.flatten(1).gather(-1, ranked), edits.flatten(1).gather(-1, ranked), ranked // width,
        edits.gather(-1, best[..., None])[..., 0], estimates.gather(-1, best[..., None])[..., 0],
        torch.argsort(pair_sums), torch.argsort(best_value))
    phrased = phrase_moves(scores, tokens, spans, phrases, rows)
    return [
        _pick(spans[c], budget, tried[c], max_estimate, zip(swap_positions[c], swap_tokens[c], swap_estimates[c]),
              best_token[c], exact_best[c], pair_order[c], insert_order[c], phrased[c])
        for c in range(chains)
    ]


def phrase_moves(scores: Tensor, tokens: Tensor, spans: list[int], phrases: list[list[tuple[int, ...]]],
                 rows: list[list[int]] | None = None) -> list[list[Move]]:
    """Per chain, for each word of ``phrases`` it lacks: its spelling and place with the lowest first-order estimate
    (the sum of its tokens' single-edit estimates there), written over the tokens there and inserted before them;
    all chains' moves best first. ``rows``: ``tokens`` as host lists, if the caller has them."""
    chains, length, _ = scores.shape
    moves: list[list[Move]] = [[] for _ in range(chains)]
    if not phrases:  # most rewards: no reading of the tokens back to the host
        return moves
    limit = torch.tensor(spans, device=scores.device)[:, None]
    spelled: list[tuple[int, tuple[int, ...]]] = []  # (word, spelling) of each best place computed below
    best_places: list[Tensor] = []  # per spelling: (C,) its lowest estimate, and (C,) where
    for word, spellings in enumerate(phrases):
        for spelling in spellings:
            k = len(spelling)
            if k > length:
                continue
            starts = length - k + 1
            columns = scores[:, :, list(spelling)]  # (C, L, k)
            estimate = sum(columns[:, j : j + starts, j] for j in range(k))  # (C, starts)
            estimate = estimate.masked_fill(torch.arange(starts, device=scores.device)[None, :] + k > limit, math.inf)
            value, where = estimate.min(-1)
            spelled.append((word, spelling))
            best_places += [value, where]
    read = to_host(*best_places, *([] if rows is not None else [tokens]))  # one read for every spelling (and the tokens)
    rows = rows if rows is not None else read[-1]
    best: list[list[tuple[float, int, tuple[int, ...]]]] = [[(math.inf, 0, ())] * chains for _ in phrases]
    for index, (word, spelling) in enumerate(spelled):
        for c, (v, t) in enumerate(zip(read[2 * index], read[2 * index + 1])):
            if v < best[word][c][0]:
                best[word][c] = (v, t, spelling)
    for word, spellings in enumerate(phrases):
        for c, (estimate, t, spelling) in enumerate(best[word]):
            if math.isfinite(estimate) and not any(_holds(rows[c][: spans[c]], s) for s in spellings):
                moves[c] += [Move("phrase", t, spelling, estimate), Move("insert", t, spelling, estimate)]
    return [sorted(chain_moves, key=lambda move: move.estimate) for chain_moves in moves]


def _holds(row: list[int], spelling: tuple[int, ...]) -> bool:
    k = len(spelling)
    return any(tuple(row[t : t + k]) == spelling for t in range(len(row) - k + 1))


def _pick(span, budget, tried, max_estimate, swaps, best_token, exact_best, pair_order, insert_order, phrased) -> list[Move]:
    """One chain's moves from its ranked lists (plain Python over a few dozen entries)."""
    moves: list[Move] = []
    seen: set[tuple] = set()

    def add(move: Move, quota: int) -> bool:
        """Add an untried move if the kind's quota allows; True once the quota is full."""
        key = (move.kind, move.position, move.tokens)
        if key not in seen and move not in tried and len(moves) < budget and math.isfinite(move.estimate) and move.estimate <= max_estimate:
            seen.add(key)
            moves.append(move)
        return sum(m.kind == move.kind for m in moves) >= quota or len(moves) >= budget

    for move in phrased:
        if add(move, max(1, budget // 4)):
            break
    swaps = [Move("swap", t, (v,), estimate) for t, v, estimate in swaps if t < span]
    for move in swaps:
        if add(move, max(1, budget // 2)):
            break
    quota = max(1, budget // 4)
    for t in pair_order:
        if t + 1 < span and add(Move("pair", t, (best_token[t], best_token[t + 1]), exact_best[t] + exact_best[t + 1]), quota):
            break
    for t in insert_order:
        if t < span and add(Move("insert", t, (best_token[t],), exact_best[t]), quota):
            break
    for move in swaps:  # fill what pairs and insertions left over with more swaps
        if len(moves) >= budget:
            break
        add(move, budget)
    return moves


def apply(tokens: list[int], move: Move) -> list[int]:
    """The token sequence after ``move`` (same length: an insertion pushes the last tokens out). On the host: a step's
    candidates go to the device together, in one copy."""
    t, length = move.position, len(tokens)
    if move.kind == "insert":
        return (tokens[:t] + list(move.tokens) + tokens[t:])[:length]
    return (tokens[:t] + list(move.tokens) + tokens[t + len(move.tokens):])[:length]
