"""Straight-through token representations: hard one-hots forward, softmax backward.

Every value computed from a :class:`ResponseBatch` is the exact value of the decoded (hard) tokens;
gradients flow to the soft one-hots ``probs = softmax(y)`` and from there to the logits ``y``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from models.lm import MemoryRecorder, Reuse


class _StraightThroughEmbedding(torch.autograd.Function):
    """``W[tokens]`` forward; backward treats the input as the soft one-hot ``probs``: ``d probs = g @ Wᵀ``.

    Exact and cheaper than ``one_hot @ W``: the forward needs no ``L×V×d`` matmul.
    """

    @staticmethod
    def forward(ctx, probs: Tensor, tokens: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.probs_dtype = probs.dtype
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (weight,) = ctx.saved_tensors
        grad_probs = (grad_out.to(weight.dtype) @ weight.T).to(ctx.probs_dtype)  # (B, L, V)
        return grad_probs, None, None


@dataclass
class ResponseBatch:
    """A batch of responses as hard tokens, with optional soft one-hots for straight-through gradients.

    ``probs is None`` means exact, gradient-free scoring (samples, baselines).
    """

    tokens: Tensor  # (B, L) long
    mask: Tensor  # (B, L) float: 1 where the token counts (up to and including the first end-of-turn)
    probs: Tensor | None = None  # (B, L, V) softmax of the logits state
    token_log_prob_ref: Tensor | None = None  # (B, L) log pi_ref(y_t | x, y_<t), filled in by the engine before rewards run
    reuse: Reuse | None = None  # edits of responses scored before: where each row's edit starts, and their memories
    recorder: MemoryRecorder | None = None  # where LM scorers leave the memories of a full pass over these rows
    index: Tensor | None = None  # of a sub-batch: its rows in the batch the recorder covers

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def embed(self, weight: Tensor, upto: int | None = None) -> Tensor:
        """Straight-through input embeddings ``(B, L, d)`` under the embedding matrix ``weight`` (V, d)."""
        tokens = self.tokens if upto is None else self.tokens[:, :upto]
        if self.probs is None:
            return F.embedding(tokens, weight)
        probs = self.probs if upto is None else self.probs[:, :upto]
        return _StraightThroughEmbedding.apply(probs, tokens, weight)

    def pick(self, table: Tensor) -> Tensor:
        """Entries ``table[b, t, tokens[b, t]]`` of a ``(B, L, V)`` table, with straight-through gradient to ``probs``."""
        picked = table.gather(-1, self.tokens[..., None])[..., 0]  # (B, L)
        if self.probs is None:
            return picked
        # Value 0, gradient d/d probs = table (the one-hot's gradient); the gradient wrt table comes from `picked`.
        return picked + ((self.probs - self.probs.detach()) * table.detach()).sum(-1)

    def columns(self, ids: Tensor) -> Tensor:
        """Straight-through one-hot values at vocabulary columns ``ids`` (k,): ``(B, L, k)`` of 0/1 values."""
        hard = (self.tokens[..., None] == ids).to(torch.float32)
        if self.probs is None:
            return hard
        soft = self.probs[..., ids]
        return hard + soft - soft.detach()

    def select(self, rows: Tensor) -> ResponseBatch:
        """The sub-batch of the given row indices (gradients flow back to this batch)."""
        return ResponseBatch(
            tokens=self.tokens[rows],
            mask=self.mask[rows],
            probs=None if self.probs is None else self.probs[rows],
            token_log_prob_ref=None if self.token_log_prob_ref is None else self.token_log_prob_ref[rows],
            reuse=None if self.reuse is None else self.reuse.rows(rows),
            recorder=self.recorder,
            index=rows if self.index is None else self.index[rows],
        )


def response_mask(tokens: Tensor, stop_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
    """1.0 for positions up to and including the first stop token (and below each row's length), else 0.0."""
    is_stop = torch.isin(tokens, stop_ids)
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()  # stop tokens strictly before t
    mask = (stops_before == 0).to(torch.float32)
    if lengths is not None:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        mask = mask * (positions[None, :] < lengths[:, None]).to(torch.float32)
    return mask
