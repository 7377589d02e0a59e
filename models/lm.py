"""Prompt rendering, cached prompt key/values, and forward passes of a response after a cached prompt.

A prompt's keys/values are computed once (``encode_prefix``) and reused for every forward pass of
its responses. Prompts of different lengths share a batch by left padding (``stack_prefixes``); the
response then starts at the same column for every row, with per-row position ids.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], system: str | None = None) -> list[int]:
    """Token ids of a chat ready for the assistant's reply; ``system`` is put first (merged with any system turn)."""
    if system is not None:
        if messages and messages[0]["role"] == "system":
            messages = [{"role": "system", "content": system + "\n\n" + messages[0]["content"]}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": system}, *messages]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = "\n\n".join(m["content"] for m in messages)
    return list(tokenizer(text)["input_ids"])


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Ids that end a response: the tokenizer's EOS and the generation config's EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


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


@torch.no_grad()
def encode_prefix(model: PreTrainedModel, ids: list[int], with_lm_head: bool = True) -> Prefix:
    """Run a prompt once and keep its keys/values. Uses ``no_grad`` (not inference mode): the tensors feed autograd later."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    cache = DynamicCache()
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(input_ids=input_ids, use_cache=True, **with_cache(backbone, cache))
    first_log_probs = None
    if with_lm_head:
        last_hidden = out.last_hidden_state[:, -1]
        first_log_probs = F.log_softmax(model.get_output_embeddings()(last_hidden).float(), dim=-1)[0]
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return Prefix(keys, values, len(ids), first_log_probs)


def stack_prefixes(prefixes: list[Prefix]) -> PrefixBatch:
    """Left-pad and concatenate one prefix per row (repeat a prefix object for each of its chains)."""
    p_max = max(p.length for p in prefixes)
    device = prefixes[0].keys[0].device
    layers = len(prefixes[0].keys)

    def padded(t: Tensor, length: int) -> Tensor:
        if length == p_max:
            return t
        pad = t.new_zeros(t.shape[0], t.shape[1], p_max - length, t.shape[3])
        return torch.cat([pad, t], dim=2)

    keys = [torch.cat([padded(p.keys[i], p.length) for p in prefixes]) for i in range(layers)]
    values = [torch.cat([padded(p.values[i], p.length) for p in prefixes]) for i in range(layers)]
    lengths = torch.tensor([p.length for p in prefixes], device=device)
    mask = (torch.arange(p_max, device=device)[None, :] >= (p_max - lengths)[:, None]).long()
    first = None
    if prefixes[0].first_log_probs is not None:
        first = torch.stack([p.first_log_probs for p in prefixes])
    return PrefixBatch(keys, values, mask, lengths, first)


def forward_after_prefix(
    module: torch.nn.Module,
    prefix: PrefixBatch,
    inputs_embeds: Tensor,
    response_mask: Tensor | None = None,
) -> tuple[Tensor, DynamicCache]:
    """Run ``module`` (a backbone) on response embeddings ``(B, L, d)`` after the cached prefix.

    Returns the last hidden states ``(B, L, d)`` and the cache (prefix + response) for incremental decoding.
    The prefix tensors are wrapped in a fresh cache each call, so they are never grown or mutated.
    """
    rows, length = inputs_embeds.shape[:2]
    cache = DynamicCache(ddp_cache_data=list(zip(prefix.keys, prefix.values)))
    if response_mask is None:
        response_mask = torch.ones(rows, length, dtype=prefix.mask.dtype, device=prefix.mask.device)
    attention_mask = torch.cat([prefix.mask, response_mask.to(prefix.mask.dtype)], dim=1)
    offset = prefix.mask.shape[1] - prefix.lengths  # left padding per row
    position_ids = torch.arange(prefix.mask.shape[1], prefix.mask.shape[1] + length, device=prefix.mask.device)
    position_ids = position_ids[None, :] - offset[:, None]
    out = module(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **with_cache(module, cache),
    )
    return out.last_hidden_state, cache


LOGIT_CHUNK_ELEMENTS = 1 << 22  # float32 logits held at once when only the picked tokens' log-probs are needed (16 MiB)


def response_token_log_probs(model: PreTrainedModel, prefix: PrefixBatch, response, return_table: bool = False):
    """Per-token ``log pi(y_t | x, y_<t)`` of a response batch ``(B, L)``, differentiable through the STE.

    ``response`` is a :class:`models.ste.ResponseBatch`. With ``return_table`` also returns the full
    ``(B, L, V)`` log-prob table. With the straight-through estimator the value
    is the exact log-prob of the hard tokens; the gradient reaches both the inputs and the targets.
    Exact scoring without a gradient or a table never builds the ``(B, L, V)`` table: it takes the picked
    logit minus the logsumexp, a few rows at a time.
    """
    first = prefix.first_log_probs[:, None, :]  # (B, 1, V)
    if response.length == 1:
        return (response.pick(first), first) if return_table else response.pick(first)
    # The last position's prediction is not needed: feed y_0 .. y_{L-2}.
    backbone = getattr(model, model.base_model_prefix)
    embeds = response.embed(model.get_input_embeddings().weight, upto=response.length - 1)  # (B, L-1, d)
    hidden, _ = forward_after_prefix(backbone, prefix, embeds)
    head = model.get_output_embeddings()
    if response.probs is None and not return_table and not torch.is_grad_enabled():
        return torch.cat([first.gather(-1, response.tokens[:, :1, None])[..., 0], _picked_log_probs(head, hidden, response.tokens[:, 1:])], 1)
    logits = head(hidden).float()  # (B, L-1, V)
    log_probs = torch.cat([first, F.log_softmax(logits, dim=-1)], dim=1)  # (B, L, V)
    picked = response.pick(log_probs)
    return (picked, log_probs) if return_table else picked


def _picked_log_probs(head: torch.nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """``log_softmax(head(hidden))[targets]`` of ``(B, T)`` targets, with only a few rows' logits alive at a time."""
    vocab = head.weight.shape[0]
    rows = max(1, LOGIT_CHUNK_ELEMENTS // (targets.shape[1] * vocab))
    picked = []
    for hidden_rows, target_rows in zip(hidden.split(rows), targets.split(rows)):
        logits = head(hidden_rows).float()  # (rows, T, V)
        picked.append(logits.gather(-1, target_rows[..., None])[..., 0] - torch.logsumexp(logits, dim=-1))
    return torch.cat(picked)
