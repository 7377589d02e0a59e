"""Cached keys/values: a prompt's (:class:`Prefix`, run once per request and reused for every pass of its responses),
several prompts' left-padded into one batch (:func:`stack_prefixes`), and a response's own (:class:`ResponseMemory`),
which an edit of that response reads for its unchanged head (:class:`Reuse`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache


@functools.cache
def _cache_keyword(module_type: type) -> str:
    return "cache" if "cache" in inspect.signature(module_type.forward).parameters else "past_key_values"


def with_cache(module: torch.nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """The keyword argument that hands ``cache`` to ``module``'s forward: ``cache`` in recent transformers, which
    deprecate ``past_key_values`` (removal announced for 5.40), and ``past_key_values`` in the older ones we support."""
    return {_cache_keyword(type(module)): cache}


@dataclass
class Prefix:
    """Keys/values of one prompt (per layer ``(1, heads, P, head_dim)``) and the log-probs of the first reply token."""

    keys: list[Tensor]
    values: list[Tensor]
    length: int
    first_log_probs: Tensor | None  # (V,) float32, None for models without an LM head
    hidden: Tensor | None = None  # (d,) the last hidden state at the position asked for (``encode_prefix``'s ``hidden_at``)


@dataclass
class PrefixBatch:
    """Prefixes of a batch of rows, left-padded to a common length."""

    keys: list[Tensor]  # per layer (B, heads, P_max, head_dim)
    values: list[Tensor]
    mask: Tensor  # (B, P_max) long, 0 on padding
    lengths: Tensor  # (B,) long, real prompt lengths
    first_log_probs: Tensor | None  # (B, V)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])


@dataclass
class ResponseMemory:
    """What a full pass over a batch of responses leaves for scoring edits of them later.

    Keys/values cover the pass's inputs, positions ``0 .. L-2``; they never carry a gradient.
    """

    log_probs: Tensor  # (B, L) float32 per-token log-probs of the responses
    keys: list[Tensor]  # per layer (B, heads, L-1, head_dim)
    values: list[Tensor]

    def rows(self, index: Tensor | slice) -> ResponseMemory:
        return ResponseMemory(self.log_probs[index], [k[index] for k in self.keys], [v[index] for v in self.values])

    def widened(self, length: int) -> ResponseMemory:
        """The same memory with zero columns up to responses of ``length`` tokens (the extra columns are never read)."""
        extra = length - self.log_probs.shape[1]
        if extra <= 0:
            return self
        keys = [F.pad(k, (0, 0, 0, extra)) for k in self.keys]  # (B, heads, L-1, d): pad the position axis
        values = [F.pad(v, (0, 0, 0, extra)) for v in self.values]
        return ResponseMemory(F.pad(self.log_probs, (0, extra)), keys, values)

    @staticmethod
    def cat(memories: list[ResponseMemory]) -> ResponseMemory:
        length = max(m.log_probs.shape[1] for m in memories)
        memories = [m.widened(length) for m in memories]
        layers = range(len(memories[0].keys))
        return ResponseMemory(torch.cat([m.log_probs for m in memories]),
                              [torch.cat([m.keys[i] for m in memories]) for i in layers],
                              [torch.cat([m.values[i] for m in memories]) for i in layers])

    def trimmed(self, length: int) -> ResponseMemory:
        """The memory of responses of ``length`` tokens (drops the columns of a batch padded past them)."""
        if self.log_probs.shape[1] == length:
            return self
        return ResponseMemory(self.log_probs[:, :length], [k[:, :, : length - 1] for k in self.keys],
                              [v[:, :, : length - 1] for v in self.values])

    def put_rows(self, index: Tensor, other: ResponseMemory) -> None:
        """Overwrite rows ``index`` with ``other``'s rows, in place."""
        self.log_probs.index_copy_(0, index, other.log_probs)
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine.index_copy_(0, index, theirs)

    def zeros_like(self, rows: int) -> ResponseMemory:
        return ResponseMemory(self.log_probs.new_zeros(rows, *self.log_probs.shape[1:]),
                              [k.new_zeros(rows, *k.shape[1:]) for k in self.keys],
                              [v.new_zeros(rows, *v.shape[1:]) for v in self.values])


class MemoryRecorder:
    """Collects, per scorer key, the :class:`ResponseMemory` of every row of a batch (scorers may see sub-batches)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.memories: dict[Hashable, ResponseMemory] = {}

    def put(self, key: Hashable, index: Tensor | None, memory: ResponseMemory) -> None:
        if index is None:
            self.memories[key] = memory
            return
        self.memories.setdefault(key, memory.zeros_like(self.rows)).put_rows(index, memory)


@dataclass
class Reuse:
    """Edited responses to score from a memory of their unedited sources.

    Row ``b`` runs input positions ``starts[b] .. L-2`` only: its log-probs at positions ``1 .. starts[b]``
    and its keys/values before ``starts[b]`` are read from ``memories[key]`` (row ``b`` holds its source's),
    so its tokens before ``starts[b] + 1`` must equal the source's.
    """

    starts: Tensor  # (B,) long
    memories: dict[Hashable, ResponseMemory]

    def rows(self, index: Tensor) -> Reuse:
        return Reuse(self.starts[index], {key: memory.rows(index) for key, memory in self.memories.items()})


def stack_prefixes(prefixes: list[Prefix]) -> PrefixBatch:
    """Left-pad and concatenate one prefix per row (repeat a prefix object for each of its chains).

    Each distinct prefix is padded once and its rows are gathered in one copy per layer; a batch of one prompt
    gets expanded views and no copy at all (the forward pass's cache concatenates them with the response anyway).
    """
    p_max = max(p.length for p in prefixes)
    device = prefixes[0].keys[0].device
    by_id = {id(p): p for p in prefixes}  # the distinct prefixes, in order of first use
    distinct = list(by_id.values())
    slot = {key: i for i, key in enumerate(by_id)}
    rows = len(prefixes)

    def padded(t: Tensor, length: int) -> Tensor:
        return t if length == p_max else F.pad(t, (0, 0, p_max - length, 0))  # (1, heads, P, d): pad the position axis on the left

    def gathered(per_prefix: list[Tensor]) -> Tensor:
        if len(per_prefix) == 1:
            return per_prefix[0].expand(rows, *per_prefix[0].shape[1:])
        return torch.cat(per_prefix).index_select(0, source)

    source = torch.tensor([slot[id(p)] for p in prefixes], device=device)
    keys = [gathered([padded(p.keys[i], p.length) for p in distinct]) for i in range(len(distinct[0].keys))]
    values = [gathered([padded(p.values[i], p.length) for p in distinct]) for i in range(len(distinct[0].values))]
    lengths = torch.tensor([p.length for p in prefixes], device=device)
    mask = (torch.arange(p_max, device=device)[None, :] >= (p_max - lengths)[:, None]).long()
    first = None
    if prefixes[0].first_log_probs is not None:
        first = gathered([p.first_log_probs[None] for p in distinct])
    return PrefixBatch(keys, values, mask, lengths, first)


def cache_over(keys: list[Tensor], values: list[Tensor]) -> DynamicCache:
    """A cache holding the given per-layer keys/values ``(B, heads, P, d)`` without copying them (a cache built from
    data concatenates it onto an empty tensor); its first update concatenates the new tokens' onto them, never in place."""
    cache = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in zip(keys, values)])
    for layer, k, v in zip(cache.layers, keys, values):
        layer.keys, layer.values = k, v
    return cache
