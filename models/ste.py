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
    from models.kv import MemoryRecorder, Reuse


def _into_base(contributions: Tensor, rows: Tensor | None, shape: torch.Size) -> Tensor:
    """Per-row contributions ``(B, T, …)`` summed into a tensor of ``shape`` ``(B0, L0, …)``: row ``b`` goes to
    ``rows[b]`` (the identity when None), positions ``T..L0-1`` stay zero."""
    if rows is None and contributions.shape == shape:
        return contributions
    base = contributions.new_zeros(shape)
    length = contributions.shape[1]
    if rows is None:
        base[:, :length] = contributions
    else:
        base[:, :length].index_add_(0, rows, contributions)
    return base


def _picked(first: Tensor, log_probs: Tensor, tokens: Tensor) -> Tensor:
    """Per-token log-probs ``(B, L)`` of ``tokens``: position 0 from ``first`` ``(B, V)``, the rest from ``log_probs``
    ``(B, L-1, V)``."""
    return torch.cat([first.gather(-1, tokens[:, :1]), log_probs.gather(-1, tokens[:, 1:, None])[..., 0]], dim=1)


class _StraightThroughEmbedding(torch.autograd.Function):
    """``W[tokens]`` forward; backward treats the input as the soft one-hot ``probs``: ``d probs = g @ Wᵀ``.

    Exact and cheaper than ``one_hot @ W``: the forward needs no ``L×V×d`` matmul. ``probs`` is the whole
    ``(B0, L0, V)`` tensor the rows were selected from (``rows``; a row may be used twice) and the tokens may
    cover only its first positions: the gradient is summed per source row *before* the ``L×V`` matmul, so a
    row scored under two prompts costs one ``g @ Wᵀ``, and no slice or row copy of ``probs`` is ever made.
    """

    @staticmethod
    def forward(ctx, probs: Tensor, rows: Tensor | None, tokens: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight, rows)
        ctx.probs_shape, ctx.probs_dtype = probs.shape, probs.dtype
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, rows = ctx.saved_tensors
        grad_embeds = _into_base(grad_out, rows, ctx.probs_shape[:2] + grad_out.shape[2:])  # (B0, L0, d): small
        grad_probs = (grad_embeds.to(weight.dtype) @ weight.T).to(ctx.probs_dtype)  # (B0, L0, V)
        return grad_probs, None, None, None


class _StraightThroughPick(torch.autograd.Function):
    """``table[b, t, tokens[b, t]]`` forward; ``d probs = g · table`` (the one-hot's gradient) and
    ``d table = g`` at the picked entries."""

    @staticmethod
    def forward(ctx, table: Tensor, probs: Tensor, rows: Tensor | None, tokens: Tensor) -> Tensor:
        ctx.save_for_backward(table.detach(), rows, tokens)
        ctx.probs_shape = probs.shape
        return table.gather(-1, tokens[..., None])[..., 0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        table, rows, tokens = ctx.saved_tensors
        grad_table = grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_table = torch.zeros_like(table).scatter_(-1, tokens[..., None], grad[..., None])
        if ctx.needs_input_grad[1]:
            grad_probs = _into_base(table * grad[..., None], rows, ctx.probs_shape)
        return grad_table, grad_probs, None, None


class _StraightThroughLogProbs(torch.autograd.Function):
    """Per-token log-probs ``(B, L)`` of the hard tokens: position 0 from the constant ``first`` ``(B, V)``, the
    rest from ``log_softmax(logits)`` ``(B, L-1, V)``; straight-through gradient to ``probs``.

    :class:`_StraightThroughPick` of ``cat(first, log_softmax(logits))`` with the ``L×V`` work fused: the
    backward is ``d logits = g·(onehot − softmax)`` and ``d probs = g · log_probs``, one pass each. Also returns
    the detached log-prob table ``(B, L-1, V)``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, probs: Tensor, rows: Tensor | None, tokens: Tensor, first: Tensor):
        log_probs = F.log_softmax(logits, dim=-1)
        picked = _picked(first, log_probs, tokens)
        ctx.save_for_backward(log_probs, rows, tokens, first)
        ctx.probs_shape = probs.shape
        ctx.mark_non_differentiable(log_probs)
        return picked, log_probs

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_table: Tensor | None):
        log_probs, rows, tokens, first = ctx.saved_tensors
        later = grad[:, 1:, None]  # (B, L-1, 1)
        grad_logits = grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_logits = log_probs.exp().mul_(-later).scatter_add_(-1, tokens[:, 1:, None], later)
        if ctx.needs_input_grad[1]:
            contributions = torch.empty(grad.shape + log_probs.shape[-1:], dtype=log_probs.dtype, device=log_probs.device)
            torch.mul(first[:, None], grad[:, :1, None], out=contributions[:, :1])
            torch.mul(log_probs, later, out=contributions[:, 1:])
            grad_probs = _into_base(contributions, rows, ctx.probs_shape)
        return grad_logits, grad_probs, None, None, None


@dataclass
class ResponseBatch:
    """A batch of responses as hard tokens, with optional soft one-hots for straight-through gradients.

    ``probs is None`` means exact, gradient-free scoring (samples, baselines). A sub-batch (``select``) keeps
    the whole ``probs`` of the batch it came from and maps its rows to it (``probs_rows``): the ``L×V``
    tensors are never copied row by row, and their gradients are summed per source row.
    """

    tokens: Tensor  # (B, L) long
    mask: Tensor  # (B, L) float: 1 where the token counts (up to and including the first end-of-turn)
    probs: Tensor | None = None  # (B0, L, V) softmax of the logits state of the rows this batch was selected from
    probs_rows: Tensor | None = None  # (B,) long: each row's row of ``probs``; None: the same rows
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

    def soft(self) -> Tensor | None:
        """This batch's own soft one-hots ``(B, L, V)`` (a copy for a sub-batch): for rewards that read them whole."""
        if self.probs is None or self.probs_rows is None:
            return self.probs
        return self.probs[self.probs_rows]

    def embed(self, weight: Tensor, upto: int | None = None, scale: Tensor | float = 1.0) -> Tensor:
        """Straight-through input embeddings ``(B, L, d)`` under the embedding matrix ``weight`` (V, d), times the
        model's embedding ``scale`` (``models.lm.embedding_scale``)."""
        tokens = self.tokens if upto is None else self.tokens[:, :upto]
        if self.probs is None:
            embeds = F.embedding(tokens, weight)
        else:
            embeds = _StraightThroughEmbedding.apply(self.probs, self.probs_rows, tokens, weight)
        return embeds if isinstance(scale, float) and scale == 1.0 else embeds * scale

    def pick(self, table: Tensor) -> Tensor:
        """Entries ``table[b, t, tokens[b, t]]`` of a ``(B, L, V)`` table, with straight-through gradient to ``probs``."""
        if self.probs is None:
            return table.gather(-1, self.tokens[..., None])[..., 0]  # (B, L)
        return _StraightThroughPick.apply(table, self.probs, self.probs_rows, self.tokens)

    def pick_log_softmax(self, logits: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token log-probs ``(B, L)``: position 0 from the first position's log-probs ``first`` ``(B, V)``, the
        rest from the logits ``(B, L-1, V)`` predicting them; also their log-prob table ``(B, L-1, V)`` (detached
        when there is a gradient). The same as ``pick`` of the whole table, with the gradient's ``L×V`` passes fused."""
        if self.probs is None:
            log_probs = F.log_softmax(logits, dim=-1)
            return _picked(first, log_probs, self.tokens), log_probs
        return _StraightThroughLogProbs.apply(logits, self.probs, self.probs_rows, self.tokens, first)

    def columns(self, ids: Tensor) -> Tensor:
        """Straight-through one-hot values at vocabulary columns ``ids`` (k,): ``(B, L, k)`` of 0/1 values."""
        hard = (self.tokens[..., None] == ids).to(torch.float32)
        if self.probs is None:
            return hard
        soft = self.probs[..., ids]  # (B0, L, k)
        if self.probs_rows is not None:
            soft = soft[self.probs_rows]
        return hard + soft - soft.detach()

    def select(self, rows: Tensor) -> ResponseBatch:
        """The sub-batch of the given row indices (gradients flow back to this batch)."""
        return ResponseBatch(
            tokens=self.tokens[rows],
            mask=self.mask[rows],
            probs=self.probs,
            probs_rows=None if self.probs is None else self.source_rows(rows),
            token_log_prob_ref=None if self.token_log_prob_ref is None else self.token_log_prob_ref[rows],
            reuse=None if self.reuse is None else self.reuse.rows(rows),
            recorder=self.recorder,
            index=rows if self.index is None else self.index[rows],
        )

    def source_rows(self, rows: Tensor) -> Tensor:
        """The rows of ``probs`` that rows ``rows`` of this batch stand for."""
        return rows if self.probs_rows is None else self.probs_rows[rows]


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """``Σ_t values · mask`` per row, where a position outside the mask adds nothing even if its value is ±inf or NaN
    (a model that gives a token −inf log-prob after the stop token must not make the row's sum NaN)."""
    return torch.where(mask > 0, values * mask, 0.0).sum(1)


def response_mask(tokens: Tensor, stop_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
    """1.0 for positions up to and including the first stop token (and below each row's length), else 0.0."""
    is_stop = torch.isin(tokens, stop_ids)
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()  # stop tokens strictly before t
    mask = (stops_before == 0).to(torch.float32)
    if lengths is not None:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        mask = mask * (positions[None, :] < lengths[:, None]).to(torch.float32)
    return mask
