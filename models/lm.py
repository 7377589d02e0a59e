"""Prompt rendering, cached prompt key/values, and forward passes of a response after a cached prompt.

A prompt's keys/values are computed once (``encode_prefix``) and reused for every forward pass of
its responses. Prompts of different lengths share a batch by left padding (``stack_prefixes``); the
response then starts at the same column for every row, with per-row position ids.

A full pass over a response can also leave a :class:`ResponseMemory` (its per-token log-probs and its
own keys/values). An edit of that response changes nothing before its first edited position, so it is
scored by running only the positions from there on, after the prompt and the memory's unchanged head.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jinja2.exceptions import TemplateError
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from models.ste import ResponseBatch

Message = dict[str, str]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], system: str | None = None) -> list[int]:
    """Token ids of a chat ready for the assistant's reply; ``system`` is put first (merged with any system turn)."""
    if system is not None:
        if messages and messages[0]["role"] == "system":
            messages = [{"role": "system", "content": system + "\n\n" + messages[0]["content"]}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": system}, *messages]
    if not tokenizer.chat_template:
        return list(tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"])
    # Rendered, then encoded as apply_chat_template(tokenize=True) does (no special tokens added), but straight
    # through the Rust tokenizer where there is one: the wrapper's batch path costs more than the encoding itself,
    # on every request.
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError:
        if not messages or messages[0]["role"] != "system":
            raise
        # A template without a system role (Gemma's refuses one): the system text opens the first user turn instead.
        first, rest = messages[0], messages[1:]
        if rest and rest[0]["role"] == "user":
            rest = [{"role": "user", "content": first["content"] + "\n\n" + rest[0]["content"]}, *rest[1:]]
        else:
            rest = [{"role": "user", "content": first["content"]}, *rest]
        text = tokenizer.apply_chat_template(rest, add_generation_prompt=True, tokenize=False)
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2-style byte-level BPE spells each byte as one printable character: the printable Latin-1 bytes as
    themselves, the other bytes as the characters from U+0100 on, in byte order. Character -> byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)}
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The bytes token ``token_id`` adds to a text: exact for byte-level BPE (GPT-2, SmolLM2, Llama 3...) and
    SentencePiece pieces (``▁`` a space, ``<0xNN>`` a byte); else the token decoded alone. A token may hold part of a
    character's UTF-8 bytes: only a run of tokens decodes."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    alphabet = _byte_level_alphabet()
    if "ByteLevel" in type(decoder).__name__ + repr(decoder) and all(ch in alphabet for ch in piece):
        return bytes(alphabet[ch] for ch in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    if "\u2581" in piece:
        return piece.replace("\u2581", " ").encode()
    return tokenizer.decode([int(token_id)]).encode()


@functools.lru_cache(maxsize=1 << 16)
def token_piece(tokenizer: PreTrainedTokenizerBase, token_id: int) -> tuple[str, tuple[int, ...]]:
    """A token as a listing of log-probs shows it: its text (``bytes:\\x..`` when its bytes are part of a character)
    and its bytes (none for a special token, which a decoded text leaves out)."""
    if token_id in tokenizer.all_special_ids:
        return tokenizer.convert_ids_to_tokens(token_id), ()
    raw = token_bytes(tokenizer, token_id)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)
    return text, tuple(raw)


class LogitHead:
    """A causal LM's head as its own forward applies it: ``get_output_embeddings()`` and then the model's own
    treatment of the logits, which that module alone skips (Granite divides them by ``logits_scaling``, Cohere
    multiplies them by ``logit_scale``, Gemma 2 and 3 soft-cap them at ``final_logit_softcapping``)."""

    def __init__(self, model: PreTrainedModel):
        self.linear = model.get_output_embeddings()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        scale = 1.0
        if getattr(config, "logits_scaling", None):
            scale /= float(config.logits_scaling)
        if isinstance(getattr(model, "logit_scale", None), (int, float)):  # Cohere keeps it on the model
            scale *= float(model.logit_scale)
        self.scale = scale
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.scale != 1.0 and self.linear.bias is None:
            logits = self.linear(hidden * self.scale)  # the same logits, scaled as (B, L, d), not as (B, L, V)
        else:
            logits = self.linear(hidden)
            if self.scale != 1.0:
                logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


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
    keys/values; the rest comes from the memory (see :class:`Reuse`). The rows are put in order of their start
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
