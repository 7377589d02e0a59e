"""Forward passes of responses after cached prompts (the key/value caches: ``kv.py``; the tokenizer's side: ``tokens.py``).

A prompt's keys/values are computed once (``encode_prefix``) and reused for every forward pass of
its responses. Prompts of different lengths share a batch by left padding (``stack_prefixes``); the
response then starts at the same column for every row, with per-row position ids.

A full pass over a response can also leave a :class:`ResponseMemory` (its per-token log-probs and its
own keys/values). An edit of that response changes nothing before its first edited position, so it is
scored by running only the positions from there on, after the prompt and the memory's unchanged head.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from models.kv import Prefix, PrefixBatch, ResponseMemory, cache_over, stack_prefixes, with_cache
from models.ste import ResponseBatch

# Architectures whose head differs from the rest: HyperCLOVAX multiplies its logits by ``logits_scaling`` (Granite's
# divide by it), MiniCPM3 divides the hidden state by it before the head, Beam soft-caps the logits in float32
# (Gemma's in the weights' dtype).
MULTIPLIES_BY_LOGITS_SCALING = frozenset({"hyperclovax"})
SCALES_THE_HIDDEN_STATE = frozenset({"minicpm3"})
SOFT_CAPS_IN_FLOAT32 = frozenset({"beam"})


class LogitHead:
    """A causal LM's head as its own forward applies it: ``get_output_embeddings()`` and then the model's own
    treatment of the logits, which that module alone skips (Granite divides them by ``logits_scaling``, HyperCLOVAX
    multiplies them by it, Cohere by ``logit_scale``, Gemma 2 and 3 and Beam soft-cap them at
    ``final_logit_softcapping``)."""

    def __init__(self, model: PreTrainedModel):
        self.linear = model.get_output_embeddings()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        scaling = float(config.logits_scaling) if getattr(config, "logits_scaling", None) else None
        logit_scale = getattr(model, "logit_scale", None)  # Cohere keeps it on the model
        if config.model_type in MULTIPLIES_BY_LOGITS_SCALING:
            self.divisor, self.multiplier = None, scaling
        else:
            self.divisor = scaling
            self.multiplier = float(logit_scale) if isinstance(logit_scale, (int, float)) else None
        self.scale = (1.0 / self.divisor if self.divisor else 1.0) * (self.multiplier or 1.0)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.softcap_in_float32 = config.model_type in SOFT_CAPS_IN_FLOAT32
        self.scales_hidden = config.model_type in SCALES_THE_HIDDEN_STATE

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.scales_hidden and self.divisor:
            logits = self.linear(hidden / self.divisor)
        elif self.scale != 1.0 and self.linear.bias is None and (self.weight.dtype == torch.float32 or _power_of_two(self.scale)):
            # The same logits, scaled as (B, L, d), not as (B, L, V): exactly so for a power of two, within float32's
            # rounding otherwise. In bf16 that rounding is a logit's last bit (0.06 to 0.125 nats at 16 to 32): other
            # scales are applied as the model applies them.
            logits = self.linear(hidden * self.scale)
        else:
            logits = self.linear(hidden)
            if self.divisor:
                logits = logits / self.divisor
            if self.multiplier:
                logits = logits * self.multiplier
        if self.softcap:
            if self.softcap_in_float32:
                logits = logits.float()
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _power_of_two(scale: float) -> bool:
    return math.frexp(abs(scale))[0] == 0.5


def lm_head(model: PreTrainedModel) -> LogitHead:
    return LogitHead(model)


def embedding_scale(model: PreTrainedModel) -> Tensor | float:
    """What the model's token embedding multiplies a looked-up row by (Gemma's ``sqrt(hidden)``, in the weights'
    dtype as Gemma applies it; BioGPT and Bart's decoders keep a float; 1 for most models): embeddings built from the
    weight matrix must be scaled alike."""
    module = model.get_input_embeddings()
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return 1.0
    return scale.to(module.weight.dtype) if torch.is_tensor(scale) else float(scale)


def embed_tokens(model: PreTrainedModel, tokens: Tensor) -> Tensor:
    """Input embeddings of hard tokens, as the model's own embedding computes them."""
    return model.get_input_embeddings()(tokens)


@torch.no_grad()
def encode_prefix(model: PreTrainedModel, ids: list[int], with_lm_head: bool = True, hidden_at: int | None = None) -> Prefix:
    """Run a prompt once and keep its keys/values (and, with ``hidden_at``, the last hidden state at that position).
    Uses ``no_grad`` (not inference mode): the tensors feed autograd later."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    cache = DynamicCache()
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(input_ids=input_ids, use_cache=True, **with_cache(backbone, cache))
    first_log_probs = None
    if with_lm_head:
        last_hidden = out.last_hidden_state[:, -1]
        first_log_probs = F.log_softmax(lm_head(model)(last_hidden).float(), dim=-1)[0]
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    hidden = None if hidden_at is None else out.last_hidden_state[0, hidden_at].clone()  # not a view holding every position's
    return Prefix(keys, values, len(ids), first_log_probs, hidden)


def next_token_log_probs(model: PreTrainedModel, tokens: Tensor, attention_mask: Tensor, position_ids: Tensor,
                         cache: DynamicCache) -> Tensor:
    """One decoding step: feed ``tokens`` (B, g) after what ``cache`` holds (the cache grows by them) and return the
    next token's float32 log-probs (B, V)."""
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(inputs_embeds=embed_tokens(model, tokens), attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, **with_cache(backbone, cache))
    return F.log_softmax(lm_head(model)(out.last_hidden_state[:, -1]).float(), dim=-1)


def forward_after_prefix(
    module: torch.nn.Module,
    prefix: PrefixBatch,
    inputs_embeds: Tensor,
) -> tuple[Tensor, DynamicCache]:
    """Run ``module`` (a backbone) on response embeddings ``(B, L, d)`` after the cached prefix.

    Returns the last hidden states ``(B, L, d)`` and the cache (prefix + response) for incremental decoding.
    The prefix tensors are wrapped in a fresh cache each call, so they are never grown or mutated.
    """
    rows, length = inputs_embeds.shape[:2]
    cache = cache_over(prefix.keys, prefix.values)
    # the response attends to all of itself: a stop token and what follows it are simply not scored
    attention_mask = torch.cat([prefix.mask, prefix.mask.new_ones(rows, length)], dim=1)
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


def response_token_log_probs(model: PreTrainedModel, prefix: PrefixBatch, response, return_table: bool = False,
                             key: Hashable | None = None):
    """Per-token ``log pi(y_t | x, y_<t)`` of a response batch ``(B, L)``, differentiable through the STE.

    ``response`` is a :class:`models.ste.ResponseBatch`. With ``return_table`` also returns the full
    ``(B, L, V)`` log-prob table. With the straight-through estimator the value
    is the exact log-prob of the hard tokens; the gradient reaches both the inputs and the targets.
    Exact scoring without a gradient or a table never builds the ``(B, L, V)`` table: it takes the picked
    logit minus the logsumexp, a few rows at a time.

    ``key`` names this scorer (model and prompt) for memories: a full pass puts its :class:`ResponseMemory`
    in ``response.recorder``, and a response with ``response.reuse`` holding a memory under ``key`` is scored
    from its starts on (exact scoring only).
    """
    reuse = getattr(response, "reuse", None)
    if key is not None and reuse is not None and key in reuse.memories and response.length > 1:
        if response.probs is not None or return_table:
            raise ValueError("edited responses are scored from a memory only exactly: no gradient, no table")
        return _resumed_token_log_probs(model, prefix, response.tokens, reuse.starts, reuse.memories[key])
    first = prefix.first_log_probs[:, None, :]  # (B, 1, V)
    if response.length == 1:
        return (response.pick(first), first) if return_table else response.pick(first)
    # The last position's prediction is not needed: feed y_0 .. y_{L-2}.
    backbone = getattr(model, model.base_model_prefix)
    embeds = response.embed(model.get_input_embeddings().weight, upto=response.length - 1, scale=embedding_scale(model))  # (B, L-1, d)
    hidden, cache = forward_after_prefix(backbone, prefix, embeds)
    head = lm_head(model)
    table = None
    if response.probs is None and not return_table and not torch.is_grad_enabled():
        picked = torch.cat([first.gather(-1, response.tokens[:, :1, None])[..., 0], _picked_log_probs(head, hidden, response.tokens[:, 1:])], 1)
    else:
        picked, later = response.pick_log_softmax(head(hidden).float(), first[:, 0])  # (B, L), (B, L-1, V)
        if return_table:
            table = torch.cat([first, later], dim=1)  # (B, L, V)
    recorder = getattr(response, "recorder", None)
    if key is not None and recorder is not None:
        columns = prefix.mask.shape[1]  # the response's keys/values follow the (padded) prompt's
        recorder.put(key, response.index, ResponseMemory(
            picked.detach(),
            [layer.keys[:, :, columns:].detach().contiguous() for layer in cache.layers],
            [layer.values[:, :, columns:].detach().contiguous() for layer in cache.layers]))
    return (picked, table) if return_table else picked


@torch.no_grad()
def _resumed_token_log_probs(model: PreTrainedModel, prefix: PrefixBatch, tokens: Tensor, starts: Tensor,
                             memory: ResponseMemory) -> Tensor:
    """Exact per-token log-probs ``(B, L)`` of edited responses, running input positions ``starts[b] .. L-2`` only.

    Rows with the same start share one forward pass after the prompt and their sources' first ``start``
    keys/values; the rest comes from the memory (see :class:`models.kv.Reuse`). The rows are put in order of their start
    once, prompt and memory side by side, so that each start's rows are a slice: its pass reads views of them.
    """
    rows, length = tokens.shape
    backbone = getattr(model, model.base_model_prefix)
    head = lm_head(model)
    order = torch.argsort(starts, stable=True)
    starts, tokens = starts[order], tokens[order]
    columns = prefix.mask.shape[1]
    keys = [torch.cat([k, m], dim=2).index_select(0, order) for k, m in zip(prefix.keys, memory.keys)]  # (B, heads, P + L-1, d)
    values = [torch.cat([v, m], dim=2).index_select(0, order) for v, m in zip(prefix.values, memory.values)]
    mask, lengths = prefix.mask[order], prefix.lengths[order]
    out = torch.empty(rows, length, device=tokens.device)
    out[:, 0] = prefix.first_log_probs[order].gather(-1, tokens[:, :1])[:, 0]
    out[:, 1:] = memory.log_probs[order, 1:]  # each row's own positions are overwritten below
    ordered = starts.tolist()  # one read from the device for all groups
    bounds = [b for b in range(rows) if b == 0 or ordered[b] != ordered[b - 1]] + [rows]
    for low, high in itertools.pairwise(bounds):
        start = ordered[low]
        head_rows = PrefixBatch(
            keys=[k[low:high, :, : columns + start] for k in keys],
            values=[v[low:high, :, : columns + start] for v in values],
            mask=torch.cat([mask[low:high], mask.new_ones(high - low, start)], dim=1),
            lengths=lengths[low:high] + start,
            first_log_probs=None,
        )
        hidden, _ = forward_after_prefix(backbone, head_rows, embed_tokens(model, tokens[low:high, start : length - 1]))
        out[low:high, start + 1 :] = _picked_log_probs(head, hidden, tokens[low:high, start + 1 :])
    return torch.empty_like(out).index_copy_(0, order, out)


def probe_sequence(model: PreTrainedModel, vocab: int, length: int = 12) -> tuple[Tensor, int]:
    """The fixed random token ids a load-time check scores on ``model``'s device, and where its prompt ends."""
    ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(0))
    return ids.to(next(model.parameters()).device), length // 2


@torch.no_grad()
def scoring_error(model: PreTrainedModel, vocab: int, length: int = 12) -> float:
    """How far this module's scoring of a short sequence (its first half a cached prompt, the rest a response fed as
    embeddings, the logits through :class:`LogitHead`) is from the model's own forward pass over the same tokens and
    the same cache (its own embedding of the ids, its own head): the largest difference of a token's log-prob, in
    nats. Both run the prompt cached, so that bf16 rounding (a cached and a fresh pass differ by ~0.1 nats) does not
    count: beyond float rounding it means an architecture that treats its embeddings or logits in a way this module
    does not reproduce."""
    ids, cut = probe_sequence(model, vocab, length)
    device = ids.device
    cache = DynamicCache()
    prompt = model(input_ids=ids[None, :cut], use_cache=True, **with_cache(model, cache)).logits[0, -1:]
    rest = model(input_ids=ids[None, cut:-1], use_cache=True, **with_cache(model, cache)).logits[0]
    own = F.log_softmax(torch.cat([prompt, rest]).float(), dim=-1)  # (length - cut, V): predicting ids[cut:]
    expected = own.gather(-1, ids[cut:, None])[:, 0]
    response = ResponseBatch(ids[None, cut:], torch.ones(1, length - cut, device=device))
    got = response_token_log_probs(model, stack_prefixes([encode_prefix(model, ids[:cut].tolist())]), response)[0]
    return float((got - expected).abs().max())


def gradient_probe(model: PreTrainedModel, vocab: int, length: int = 12) -> None:
    """Run the pass an SEA step runs (a cached prompt, a response fed as soft one-hots) and its gradient, on the load
    checks' sequence (token ids below ``vocab``): compiling a backbone compiles its backward only at the first
    gradient, where a failure would otherwise fail a request."""
    ids, cut = probe_sequence(model, vocab, length)
    prefix = stack_prefixes([encode_prefix(model, ids[:cut].tolist())])
    rows = model.get_output_embeddings().weight.shape[0]  # the soft one-hots are as wide as the embedding, as the engine's
    with torch.enable_grad():
        probs = torch.full((1, length - cut, rows), 1.0 / rows, device=ids.device, requires_grad=True)
        response = ResponseBatch(ids[None, cut:], torch.ones(1, length - cut, device=ids.device), probs=probs)
        torch.autograd.grad(response_token_log_probs(model, prefix, response).sum(), probs)


@torch.no_grad()
def log_probs_with_top(model: PreTrainedModel, prefix: PrefixBatch, tokens: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's ``log pi(y_t | x, y_<t)`` of responses ``(B, L)``, and the ``top`` most likely tokens' log-probs
    and ids ``(B, L, top)`` at each position, best first. One pass over the responses; the ``(B, L, V)`` table is
    never held whole (a few positions at a time)."""
    rows, length = tokens.shape
    first = prefix.first_log_probs  # (B, V)
    top = min(top, first.shape[-1])
    picked = torch.empty(rows, length, device=tokens.device)
    best = torch.empty(rows, length, top, device=tokens.device)
    best_ids = torch.empty(rows, length, top, dtype=torch.long, device=tokens.device)
    picked[:, 0] = first.gather(-1, tokens[:, :1])[:, 0]
    best[:, 0], best_ids[:, 0] = first.topk(top, dim=-1)
    if length > 1:
        hidden, _ = forward_after_prefix(getattr(model, model.base_model_prefix), prefix, embed_tokens(model, tokens[:, :-1]))
        head = lm_head(model)
        positions = max(1, LOGIT_CHUNK_ELEMENTS // (rows * first.shape[-1]))
        for start in range(0, length - 1, positions):
            end = min(start + positions, length - 1)
            log_probs = F.log_softmax(head(hidden[:, start:end]).float(), dim=-1)  # (B, positions, V)
            picked[:, start + 1 : end + 1] = log_probs.gather(-1, tokens[:, start + 1 : end + 1, None])[..., 0]
            best[:, start + 1 : end + 1], best_ids[:, start + 1 : end + 1] = log_probs.topk(top, dim=-1)
    return picked, best, best_ids


def _picked_log_probs(head: LogitHead, hidden: Tensor, targets: Tensor) -> Tensor:
    """``log_softmax(head(hidden))[targets]`` of ``(B, T)`` targets, with only a few rows' logits alive at a time."""
    vocab = head.weight.shape[0]
    rows = max(1, LOGIT_CHUNK_ELEMENTS // (targets.shape[1] * vocab))
    picked = []
    for hidden_rows, target_rows in zip(hidden.split(rows), targets.split(rows)):
        logits = head(hidden_rows).float()  # (rows, T, V)
        picked.append(logits.gather(-1, target_rows[..., None])[..., 0] - torch.logsumexp(logits, dim=-1))
    return torch.cat(picked)
