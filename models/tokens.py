"""The reference tokenizer's side: a chat rendered by its template, the ids that end a response, and each token's text
and bytes (as OpenAI's log-probs list them)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from jinja2.exceptions import TemplateError
from tokenizers import AddedToken, Tokenizer
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], system: str | None = None) -> list[int]:
    """Token ids of a chat ready for the assistant's reply; ``system`` is put first (merged with any system turn).

    Messages are text: a control token's spelling in one (``<|im_end|>\n<|im_start|>system``) is encoded as the text
    it is, as OpenAI's API does, not as the token, which would let a user's message end its turn and open a system
    one. Only the chat template's own control tokens are tokens."""
    if system is not None:
        if messages and messages[0]["role"] == "system":
            messages = [{"role": "system", "content": system + "\n\n" + messages[0]["content"]}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": system}, *messages]
    controls = _control_tokens(tokenizer)
    spelled = bool(controls) and any(control in m["content"] for m in messages for control in controls)
    if not tokenizer.chat_template:
        text = "\n\n".join(m["content"] for m in messages)
        if spelled:
            return _text_encoder(tokenizer)(text, True)
        return list(tokenizer(text)["input_ids"])
    if not spelled:
        return _encoded(tokenizer, _rendered(tokenizer, messages))
    return _encoded_spelling_controls_as_text(tokenizer, messages, controls)


def _encoded_spelling_controls_as_text(tokenizer: PreTrainedTokenizerBase, messages: list[Message], controls: list[str]) -> list[int]:
    """The chat's ids where messages spell control tokens: those spellings as text, the template's control tokens
    as tokens."""
    if any(_MARK in m["content"] or _SLOT in m["content"] for m in messages):
        raise TemplateError("a message that spells a control token may not hold U+FDD0 or U+FDD1 (noncharacters)")
    # Each control token spelt in a message stands as a mark (its index between two U+FDD0) while the template renders
    # the chat, so that the template's own control tokens are told apart; those are then put in slots, tokens the
    # spellings cannot match, the marks become their spellings again, and the chat is encoded at once with every
    # control token's spelling as text (encoded in pieces, a tokenizer that strips the whitespace beside a control
    # token, or that puts "▁" before the first word of a text only, would read the template's text otherwise).
    pattern = _control_pattern(tuple(controls))
    index = {control: i for i, control in enumerate(controls)}
    text = _rendered(tokenizer, [{**m, "content": pattern.sub(lambda found: f"{_MARK}{index[found.group()]}{_MARK}", m["content"])}
                                 for m in messages])
    def spelt(text: str) -> str:
        return _MARKED.sub(lambda found: controls[int(found.group(1))], text)

    slots = _slotted_encoder(tokenizer)
    if slots is None:  # encoded in pieces between the template's control tokens
        ids: list[int] = []
        at = 0
        for found in pattern.finditer(text):
            ids += _text_encoder(tokenizer)(spelt(text[at : found.start()]), False)
            ids.append(int(tokenizer.convert_tokens_to_ids(found.group())))
            at = found.end()
        return ids + _text_encoder(tokenizer)(spelt(text[at:]), False)
    copy, slot_of, control_id = slots
    text = spelt(pattern.sub(lambda found: slot_of[found.group()], text))
    return [control_id.get(i, i) for i in copy.encode(text, add_special_tokens=False).ids]


# Noncharacters (never meant to be in text): the marks that stand for the control tokens spelt in messages while the
# template renders the chat, and the slots that stand for the template's own control tokens.
_MARK = "\ufdd0"
_SLOT = "\ufdd1"
_MARKED = re.compile(f"{_MARK}([0-9]+){_MARK}")


def _rendered(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    """The chat as its template renders it for the assistant's reply."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError:
        if not messages or messages[0]["role"] != "system":
            raise
        # A template without a system role (Gemma's refuses one): the system text opens the first user turn instead.
        first, rest = messages[0], messages[1:]
        if rest and rest[0]["role"] == "user":
            rest = [{"role": "user", "content": first["content"] + "\n\n" + rest[0]["content"]}, *rest[1:]]
        else:
            rest = [{"role": "user", "content": first["content"]}, *rest]
        return tokenizer.apply_chat_template(rest, add_generation_prompt=True, tokenize=False)


def _encoded(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text`` encoded as apply_chat_template(tokenize=True) does (no special tokens added), but straight through the
    Rust tokenizer where there is one: the wrapper's batch path costs more than the encoding itself, on every request."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=8)
def _control_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special tokens (``<|im_start|>``, ``<|endoftext|>``...), longest first."""
    added = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return sorted({token for token in added | set(tokenizer.all_special_tokens) if token}, key=len, reverse=True)


@functools.lru_cache(maxsize=8)
def _control_pattern(controls: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(control) for control in controls))


def prepare_text_encoders(tokenizer: PreTrainedTokenizerBase) -> None:
    """Build now the copies of the tokenizer that read a control token's spelling as text (for keywords, and messages
    that spell one), not on a request: a copy of a large vocabulary takes a moment."""
    _text_encoder(tokenizer)
    _slotted_encoder(tokenizer)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of ``text`` as text: a special token's spelling in it is not the token (no special tokens added)."""
    return _text_encoder(tokenizer)(text, False)


@functools.lru_cache(maxsize=8)
def _text_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[str, bool], list[int]]:
    """Encodes a text with every special token's spelling as plain text: ``(text, add_special_tokens) -> ids``. A copy
    of the Rust tokenizer that is set so once (the shared one is used from several threads)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None:
        return lambda text, add: list(tokenizer(text, add_special_tokens=add, split_special_tokens=True)["input_ids"])
    copy = _text_copy(backend)
    return lambda text, add: copy.encode(text, add_special_tokens=add).ids


@functools.lru_cache(maxsize=8)
def _slotted_encoder(tokenizer: PreTrainedTokenizerBase) -> tuple[Tokenizer, dict[str, str], dict[int, int]] | None:
    """A copy of the Rust tokenizer that encodes every special token's spelling as text, with a slot per control token:
    an added token (not special, so matched still) with the control token's whitespace handling. The copy, each
    control token's slot, and each slot's id -> its control token's id. None for a tokenizer without a Rust one, or
    whose vocabulary leaves a slot no id of its own."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None:
        return None
    copy = _text_copy(backend)
    taken = set(backend.get_vocab(with_added_tokens=True).values())
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    slot_of, control_id = {}, {}
    for index, control in enumerate(_control_tokens(tokenizer)):
        slot_of[control] = f"{_SLOT}{index}{_SLOT}"
        like = added.get(control)
        copy.add_tokens([AddedToken(slot_of[control], special=False, normalized=False,
                                    lstrip=bool(like and like.lstrip), rstrip=bool(like and like.rstrip),
                                    single_word=bool(like and like.single_word))])
        slot_id = copy.token_to_id(slot_of[control])
        if slot_id is None or slot_id in taken:  # a vocabulary with gaps: a new token may get a used id
            return None
        control_id[slot_id] = int(tokenizer.convert_tokens_to_ids(control))
    return copy, slot_of, control_id


def _text_copy(backend: Tokenizer) -> Tokenizer:
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = True
    return copy


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


@dataclass(frozen=True, eq=False)
class TokenText:
    """The text of token ids under one tokenizer: a response's (up to its first stop token), each token's piece (as
    OpenAI's log-probs list it), any ids' decoding."""

    tokenizer: PreTrainedTokenizerBase
    stop_ids: frozenset[int]

    def response(self, tokens: Tensor | list[int]) -> tuple[str, int, bool]:
        """A response's text up to its first stop token, the number of its tokens that count (the stop included), and
        whether it stopped."""
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        end = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        kept = ids if end is None else ids[:end]
        counted = len(ids) if end is None else end + 1
        return self.decode(kept), counted, end is not None

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def piece(self, token: int) -> tuple[str, tuple[int, ...]]:
        """A token's text and its bytes (:func:`token_piece`)."""
        return token_piece(self.tokenizer, token)
