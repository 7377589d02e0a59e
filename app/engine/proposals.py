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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Move:
    kind: str  # "swap", "pair" or "insert"
    position: int
    tokens: tuple[int, ...]
    estimate: float  # first-order energy change (nats; lower is better)


def edit_scores(grad: Tensor | None, table: Tensor | None, tokens: Tensor) -> Tensor:
    """First-order energy change of putting token v at position t: ``(L, V)``.

    With ``grad`` (dE/d one-hot) this is ``G[t, v] − G[t, y_t]``: the exact change of the position's
    own log-prob plus the linearised change of every later term and of the reward. Without it (the
    gradient-free ablation) only the reference LM's own term is used: ``−(log p[t, v] − log p[t, y_t])``.
    """
    if grad is not None:
        return grad - grad.gather(-1, tokens[:, None])
    return -(table - table.gather(-1, tokens[:, None]))


def propose(
    scores: Tensor,
    tokens: Tensor,
    counted: int,
    budget: int,
    temperature: float,
    generator: torch.Generator,
    tried: set[Move],
    max_estimate: float = math.inf,
) -> list[Move]:
    """Up to ``budget`` distinct untried moves of one chain, drawn by estimated gain with Gumbel noise.

    Moves whose first-order estimate is above ``max_estimate`` nats are not worth an exact evaluation.

    ``scores`` (L, V) from :func:`edit_scores`; ``counted`` positions take part (up to the first stop).
    About half the budget goes to single swaps, a quarter to adjacent pairs and a quarter to insertions.
    """
    length, vocab = scores.shape
    span = max(1, min(counted, length))
    scores = scores[:span].clone()
    scores.scatter_(-1, tokens[:span, None], float("inf"))  # "change" to the same token is no move
    if temperature > 0:
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(1e-12, 1 - 1e-12)
        noisy = scores + temperature * torch.log(-torch.log(uniform))  # minus a Gumbel sample: lower is better
    else:
        noisy = scores
    moves: list[Move] = []
    seen: set[tuple] = set()

    def add(move: Move, quota: int) -> bool:
        """Add an untried move if the kind's quota allows; True once the quota is full."""
        key = (move.kind, move.position, move.tokens)
        if key not in seen and move not in tried and len(moves) < budget and move.estimate <= max_estimate:
            seen.add(key)
            moves.append(move)
        return sum(m.kind == move.kind for m in moves) >= quota or len(moves) >= budget

    pool = min(scores.numel(), 4 * budget + len(tried))  # enough ranked swaps to skip those already tried
    ranked = torch.topk(-noisy.flatten(), pool).indices.tolist()
    n_swaps = max(1, budget // 2)
    for index in ranked:
        t, v = divmod(index, vocab)
        if add(Move("swap", t, (v,), float(scores[t, v])), n_swaps):
            break
    best_value, best_token = noisy.min(-1)  # (span,)
    exact_best = scores.gather(-1, best_token[:, None])[:, 0]
    quota = max(1, budget // 4)
    if span > 1:
        for t in torch.argsort(best_value[:-1] + best_value[1:]).tolist():
            pair = Move("pair", t, (int(best_token[t]), int(best_token[t + 1])), float(exact_best[t] + exact_best[t + 1]))
            if add(pair, quota):
                break
    for t in torch.argsort(best_value).tolist():
        if add(Move("insert", t, (int(best_token[t]),), float(exact_best[t])), quota):
            break
    for index in ranked:  # fill what pairs and insertions left over with more swaps
        if len(moves) >= budget:
            break
        t, v = divmod(index, vocab)
        add(Move("swap", t, (v,), float(scores[t, v])), budget)
    return moves


def apply(tokens: Tensor, move: Move) -> Tensor:
    """The token sequence after ``move`` (same length: an insertion pushes the last token out)."""
    out = tokens.clone()
    t = move.position
    if move.kind == "insert":
        out[t + 1 :] = tokens[t:-1].clone()
        out[t] = move.tokens[0]
    else:
        new = torch.tensor(move.tokens, dtype=tokens.dtype, device=tokens.device)[: tokens.shape[0] - t]
        out[t : t + len(new)] = new
    return out
