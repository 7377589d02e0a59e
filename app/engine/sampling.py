"""Sampling from the reference policy after a cached prompt, with a per-request random generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from models.lm import Prefix, stack_prefixes


@dataclass
class Samples:
    tokens: Tensor  # (N, L) long; positions after the first stop token hold a stop token
    log_probs: Tensor | None  # (N, L, V) float32 log pi_ref at each position (only when asked for)
    forward_token_passes: int


def _filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    prefix: Prefix,
    n: int,
    max_tokens: int,
    stop_ids: Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
    keep_log_probs: bool = False,
    given: Tensor | None = None,
) -> Samples:
    """Draw ``n`` responses of at most ``max_tokens`` tokens; ``temperature = 0`` is greedy decoding.

    With ``given`` (n, g) the responses continue those tokens (their keys/values are computed first):
    ``max_tokens`` new tokens are drawn and returned after them.
    """
    backbone = getattr(model, model.base_model_prefix)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    batch = stack_prefixes([prefix] * n)
    device = batch.mask.device
    cache = DynamicCache(ddp_cache_data=list(zip(batch.keys, batch.values)))
    mask = batch.mask
    log_probs = batch.first_log_probs  # (N, V)
    passes = 0
    start = 0
    if given is not None and given.shape[1] > 0:
        start = given.shape[1]
        mask = torch.cat([mask, torch.ones(n, start, dtype=mask.dtype, device=device)], dim=1)
        out = backbone(inputs_embeds=embed(given), attention_mask=mask, past_key_values=cache, use_cache=True,
                       position_ids=torch.arange(prefix.length, prefix.length + start, device=device)[None].expand(n, -1))
        log_probs = F.log_softmax(head(out.last_hidden_state[:, -1]).float(), dim=-1)
        passes += n * start
    tokens = torch.full((n, max_tokens), int(stop_ids[0]), dtype=torch.long, device=device)
    tables = [] if keep_log_probs else None
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    if given is not None and given.shape[1] > 0:
        finished |= torch.isin(given, stop_ids).any(1)
    for t in range(max_tokens):
        if t > 0:
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
            position = torch.full((n, 1), prefix.length + start + t - 1, device=device)
            out = backbone(
                inputs_embeds=embed(tokens[:, t - 1 : t]),
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
            )
            log_probs = F.log_softmax(head(out.last_hidden_state[:, -1]).float(), dim=-1)
            passes += n
        if tables is not None:
            tables.append(log_probs)
        if temperature <= 0:
            next_token = log_probs.argmax(-1)
        else:
            probs = torch.softmax(_filter_top_p(log_probs / temperature, top_p), dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        next_token = torch.where(finished, tokens[:, t], next_token)
        tokens[:, t] = next_token
        finished |= torch.isin(next_token, stop_ids)
        if bool(finished.all()):
            if tables is not None:  # positions after every row stopped: uniform stop tokens, table unused
                tables.extend([log_probs] * (max_tokens - t - 1))
            break
    table = torch.stack(tables, dim=1) if tables is not None else None
    if given is not None and given.shape[1] > 0:
        tokens = torch.cat([given, tokens], dim=1)
    return Samples(tokens, table, passes)
