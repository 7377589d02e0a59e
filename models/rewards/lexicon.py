"""The word rewards: a weight per word, paid once a response spells the word (or one of its forms) whole, differentiably
through the straight-through one-hots; keyword coverage of plain text for the evaluation."""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from models.rewards.base import Prompt, RewardComponent
from models.ste import ResponseBatch
from models.tokens import encode_text

# Endings glued to a matched word that may follow it and still count, where the word takes that ending ("dogs",
# "kicked", "sledding" never "flys"; as ``keyword_coverage``, by ``word_forms``).
WORD_SUFFIXES = ("s", "es", "ed", "ing")


@dataclass
class WordEdges:
    """Per vocabulary id, how a token joins its neighbours in decoded text (so a word is matched whole).

    ``opens[v]``: v starts a new word after a letter (it begins with a space or a punctuation mark, or the
    tokenizer puts a space between tokens); ``closes[v]``: a word that follows v starts a new word;
    ``ending[v]``: which of ``WORD_SUFFIXES`` v is, glued to the word before it (−1: none).
    """

    opens: Tensor  # (V,) bool
    closes: Tensor
    ending: Tensor  # (V,) long

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> WordEdges:
        size = len(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer decodes a batch in Rust, several times faster

        def decode(batch: list[list[int]]) -> list[str]:
            return backend.decode_batch(batch, skip_special_tokens=False) if backend is not None else tokenizer.batch_decode(batch)

        pieces = decode([[i] for i in range(size)])
        # A plain word token (lowercase and longer than a letter where there is one), to see what decoding puts at
        # each side of every token.
        letters = [i for i, p in enumerate(pieces) if p.isalpha()] or [0]
        probe = next((i for i in letters if pieces[i].islower() and len(pieces[i]) > 1), letters[0])
        head = pieces[probe]
        after = decode([[probe, i] for i in range(size)])  # head + [separator] + piece
        before = decode([[i, probe] for i in range(size)])  # piece + [separator] + head
        opens, closes, ending = [], [], []
        for piece, a, b in zip(pieces, after, before):
            tail = a[len(head):] if a.startswith(head) else " "
            opens.append(not tail[:1].isalnum())
            lead = b[: -len(head)] if b.endswith(head) else " "
            closes.append(not lead[-1:].isalnum())
            ending.append(WORD_SUFFIXES.index(tail) if tail in WORD_SUFFIXES else -1)
        return cls(torch.tensor(opens), torch.tensor(closes), torch.tensor(ending))


_word_edges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def word_edges(tokenizer: PreTrainedTokenizerBase) -> WordEdges:
    """:class:`WordEdges` of ``tokenizer``, computed once per tokenizer (under a second for a 50k vocabulary)."""
    if tokenizer not in _word_edges:
        _word_edges[tokenizer] = WordEdges.of(tokenizer)
    return _word_edges[tokenizer]


@dataclass
class _WordPattern:
    word: str
    weight: float
    variants: list[Tensor]  # token-id sequences that spell the word or one of its forms
    endings: list[Tensor]  # per variant, (len(WORD_SUFFIXES) + 1,) bool: which glued endings make a form of the word; the last, "none", False
    spells_word: list[bool]  # per variant: it spells the word itself, not an irregular form


@dataclass
class _Spellings:
    """What matching the spellings takes, on one device."""

    ids: Tensor  # (K,) every vocabulary id the spellings use
    groups: list[_SpellingGroup]  # the spellings grouped by their number of tokens
    opens: Tensor  # the tokenizer's WordEdges tables, on this device
    closes: Tensor
    ending: Tensor


@dataclass
class _SpellingGroup:
    """The spellings of one number of tokens k, for matching them all at once."""

    columns: Tensor  # (n, k) each spelling's tokens, as columns of the ids gathered once
    spells: Tensor  # (n, W) bool: the word each spelling spells (one a row)
    first_opens: Tensor  # (n,) bool: its first token starts a word by itself
    endings: Tensor  # (n, len(WORD_SUFFIXES) + 1) bool: the glued endings that make a form after it


class LexiconReward(RewardComponent):
    """Weighted word presence: ``Σ_w weight_w · [w appears in the response]``, exact under the STE forward.

    Each word is matched as itself or one of its irregular forms ("threw" uses "throw"), each as any of its
    spellings' token sequences (in lowercase and capitalised, the word also as written, each with a leading space
    or not);
    a multi-token word counts when all its tokens stand in a row, as a whole word: not glued to a letter
    before it or after it (a glued ending that makes a regular form is allowed: "river" + "s", not "fly" + "s"),
    so "riverboat" holds neither "river" nor "boat". The gradient of a missing word points at its tokens at
    every position where it would stand as a word, so it names words the base model rarely proposes. With
    ``weights = 1/n`` it is the keyword coverage in [0, 1], as ``keyword_coverage`` reads it from the text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, weights: dict[str, float], name: str = "lexicon", vocab: int | None = None):
        """``vocab``: the token ids the model has rows for (a tokenizer may be larger, as Gemma 3's): a spelling with a
        token past them is one the model cannot write."""
        self.name = name
        self.lm_passes = 0
        self.patterns: list[_WordPattern] = []
        self.tokenizer = tokenizer
        self._spellings_on: dict[torch.device, _Spellings] = {}
        self._phrases: list[list[tuple[int, ...]]] | None = None
        unknown = tokenizer.unk_token_id
        for word, weight in weights.items():
            forms = word_forms(word)
            endings_of = {}  # token sequence -> the glued endings that make a form after it
            spells_word = {}  # token sequence -> whether it spells the word itself (not an irregular form)
            # The word and its irregular forms, each after a space or not, in lowercase and with a capital first letter
            # (not str.capitalize, which lowercases the rest: "iPhone", "iphone", "IPhone", never "Iphone"), the word
            # also as written: "Violin" asked for is "violin" in a sentence. Regular forms come from glued endings:
            # spelling them whole too ("doging", "frisbeed") gave the phrase moves nonsense to write (seed 0 of the
            # keyword set: all four words 0.97 -> 0.73).
            for form in sorted({word.lower(), *IRREGULAR_FORMS.get(word.lower(), ())}):
                itself = form == word.lower()
                cases = {word, form, word[:1].upper() + word[1:]} if itself else {form, form[:1].upper() + form[1:]}
                endings = torch.tensor([form + suffix in forms for suffix in WORD_SUFFIXES] + [False])
                for spelling in (prefix + case for case in cases for prefix in ("", " ")):
                    seq = tuple(encode_text(tokenizer, spelling))  # "<|im_end|>" asked for is text, not the stop token
                    if seq and unknown not in seq and (vocab is None or max(seq) < vocab):
                        endings_of[seq], spells_word[seq] = endings, itself
            if endings_of:
                seqs = sorted(endings_of)
                self.patterns.append(_WordPattern(word, float(weight), [torch.tensor(s) for s in seqs], [endings_of[s] for s in seqs],
                                                  [spells_word[s] for s in seqs]))

    @classmethod
    def keywords(cls, tokenizer: PreTrainedTokenizerBase, words: list[str], vocab: int | None = None) -> LexiconReward:
        """Keyword coverage reward: the fraction of ``words`` that the response uses."""
        unique = list({w.strip().lower(): w.strip() for w in words if w.strip()}.values())  # "Dog" and "dog" are one word
        return cls(tokenizer, {w: 1.0 / len(unique) for w in unique}, name="keywords", vocab=vocab)

    @property
    def edges(self) -> WordEdges:
        # Looked up on first use, in the engine's thread: building them (once per tokenizer) must not hold up the event loop.
        return word_edges(self.tokenizer)

    def prepare(self, prompt: Prompt) -> object:
        return None

    def phrases(self) -> list[list[tuple[int, ...]]]:
        """Per rewarded word, its own spellings of two or more tokens (the proposals' phrase moves write them whole);
        worked out once (every step of every request asks)."""
        if self._phrases is None:
            words = [[tuple(v.tolist()) for v, own in zip(p.variants, p.spells_word) if own and len(v) > 1]
                     for p in self.patterns if p.weight > 0]
            self._phrases = [spellings for spellings in words if spellings]
        return self._phrases

    def _spellings(self, device: torch.device) -> _Spellings:
        """The spellings' tensors on ``device``, built once (a copy to a GPU each step waits for it). Built as normal
        tensors even when first needed under inference mode (a baseline's), since a later SEA run saves them for its
        backward."""
        if device not in self._spellings_on:
            with torch.inference_mode(False):
                self._spellings_on[device] = self._build_spellings(device)
        return self._spellings_on[device]

    def _build_spellings(self, device: torch.device) -> _Spellings:
        ids = sorted({int(i) for p in self.patterns for v in p.variants for i in v})
        column = {token: c for c, token in enumerate(ids)}
        opens = self.edges.opens
        by_length: dict[int, list[tuple[int, Tensor, Tensor]]] = {}
        for w, pattern in enumerate(self.patterns):
            for seq, endings in zip(pattern.variants, pattern.endings):
                by_length.setdefault(len(seq), []).append((w, seq, endings))
        groups = []
        for k, rows in sorted(by_length.items()):
            seqs = torch.stack([seq for _, seq, _ in rows])
            spells = torch.zeros(len(rows), len(self.patterns), dtype=torch.bool)
            spells[torch.arange(len(rows)), torch.tensor([w for w, _, _ in rows])] = True
            groups.append(_SpellingGroup(
                columns=torch.tensor([[column[int(i)] for i in seq] for _, seq, _ in rows], device=device),
                spells=spells.to(device),
                first_opens=torch.tensor([int(seq[0]) >= len(opens) or bool(opens[seq[0]]) for seq in seqs], device=device),
                endings=torch.stack([endings for _, _, endings in rows]).to(device),
            ))
        return _Spellings(torch.tensor(ids, dtype=torch.long, device=device), groups,
                          *(table.to(device) for table in (self.edges.opens, self.edges.closes, self.edges.ending)))

    def presence(self, response: ResponseBatch) -> Tensor:
        """Per word presence ``(B, W)`` in {0, 1} (straight-through).

        Presence is a noisy-or over start positions and spellings, ``1 − Π (1 − x)``: exact on hard
        tokens, and where the word is absent every position gets the full first-order gain of placing
        it there (an ``amax`` would split that gain over the L tied positions). All spellings of one length are
        matched at once, from one gather of the vocabulary columns they use (one gradient scatter into ``probs``).
        """
        spellings = self._spellings(response.tokens.device)
        size = len(spellings.opens)
        rows, length = response.rows, response.length
        # Ids past the tokenizer's (padding rows of the embedding) count as word boundaries.
        outside = response.tokens >= size
        tokens = response.tokens.clamp(max=size - 1)
        opens, closes = (table[tokens] | outside for table in (spellings.opens, spellings.closes))  # (B, L), from the hard tokens
        ending = torch.where(outside, -1, spellings.ending[tokens])
        boundary = (response.mask == 0) | opens  # a word may end before these, or before an ending it takes
        columns = response.columns(spellings.ids) * response.mask[..., None]  # (B, L, K)
        absent = torch.ones(rows, len(self.patterns), device=columns.device)
        for group in spellings.groups:
            k = group.columns.shape[1]
            if k > length:
                continue
            starts = length - k + 1
            cols = columns[:, :, group.columns]  # (B, L, n, k)
            # All k tokens in a row starting at t: min over j of cols[t + j, j].
            aligned = torch.stack([cols[:, j : j + starts, :, j] for j in range(k)], dim=-1).amin(-1)  # (B, starts, n)
            # Only spellings that end inside the response: one running into padding (a batch mate's longer length) is
            # 0 anyway, but amin would split its gradient between the padding's 0 and the real token's.
            aligned = aligned * response.mask[:, k - 1 : k - 1 + starts, None]
            # Whole words only: a boundary before t (the first token opens a word, or t = 0, or the token before
            # closes one) and after t + k − 1 (the end, a token that opens a word, or an ending that makes a form
            # of the word after this spelling). Taken from the hard neighbours: constant under the straight-through gradient.
            before = torch.cat([torch.ones_like(closes[:, :1]), closes[:, : starts - 1]], dim=1)  # (B, starts)
            left = group.first_opens | before[..., None]  # (B, starts, n)
            ends = boundary[..., None] | group.endings[:, ending].permute(1, 2, 0)  # (B, L, n); ending −1: "none", False
            right = torch.cat([ends[:, k:], torch.ones_like(ends[:, :1])], dim=1)  # (B, starts, n)
            missing = (1.0 - aligned * (left & right).to(aligned.dtype)).prod(1)  # (B, n)
            absent = absent * torch.where(group.spells, missing[:, :, None], 1.0).prod(1)  # (B, W): per word, its spellings
        return 1.0 - absent

    def score(self, contexts: list[object], response: ResponseBatch) -> Tensor:
        if not self.patterns:  # nothing to find: no reward (and no gather of no columns)
            return torch.zeros(response.rows, device=response.tokens.device)
        weights = torch.tensor([p.weight for p in self.patterns], device=response.tokens.device)
        return (self.presence(response) * weights).sum(-1)


# Irregular plurals, past tenses and participles of common English words: "threw" uses "throw".
IRREGULAR_FORMS = {word: forms.split() for word, forms in (
    ("be", "am is are was were been"), ("begin", "began begun"), ("bite", "bit bitten"), ("bleed", "bled"),
    ("blow", "blew blown"), ("break", "broke broken"), ("bring", "brought"), ("build", "built"), ("buy", "bought"),
    ("catch", "caught"), ("child", "children"), ("choose", "chose chosen"), ("come", "came"), ("dig", "dug"),
    ("do", "did done does"), ("draw", "drew drawn"), ("dream", "dreamt"), ("drink", "drank drunk"),
    ("drive", "drove driven"), ("eat", "ate eaten"), ("fall", "fell fallen"), ("feed", "fed"), ("feel", "felt"),
    ("fight", "fought"), ("find", "found"), ("fly", "flew flown"), ("foot", "feet"), ("forget", "forgot forgotten"),
    ("freeze", "froze frozen"), ("get", "got gotten"), ("give", "gave given"), ("go", "went gone goes"),
    ("goose", "geese"), ("grow", "grew grown"), ("hang", "hung"), ("have", "has had"), ("hear", "heard"),
    ("hide", "hid hidden"), ("hold", "held"), ("keep", "kept"), ("kneel", "knelt"), ("know", "knew known"),
    ("lay", "laid"), ("lead", "led"), ("leave", "left"), ("lend", "lent"), ("lie", "lay lain lying"), ("light", "lit"),
    ("lose", "lost"), ("make", "made"), ("man", "men"), ("mean", "meant"), ("meet", "met"), ("mouse", "mice"),
    ("pay", "paid"), ("person", "people"), ("ride", "rode ridden"), ("ring", "rang rung"), ("rise", "rose risen"),
    ("run", "ran"), ("say", "said"), ("see", "saw seen"), ("sell", "sold"), ("send", "sent"), ("shake", "shook shaken"),
    ("shine", "shone"), ("shoot", "shot"), ("sing", "sang sung"), ("sink", "sank sunk"), ("sit", "sat"),
    ("sleep", "slept"), ("slide", "slid"), ("speak", "spoke spoken"), ("spend", "spent"), ("spin", "spun"),
    ("stand", "stood"), ("steal", "stole stolen"), ("stick", "stuck"), ("sting", "stung"), ("strike", "struck"),
    ("string", "strung"), ("sweep", "swept"), ("swim", "swam swum"), ("swing", "swung"), ("take", "took taken"),
    ("teach", "taught"), ("tear", "tore torn"), ("tell", "told"), ("think", "thought"), ("throw", "threw thrown"),
    ("tooth", "teeth"), ("wake", "woke woken"), ("wear", "wore worn"), ("weep", "wept"), ("win", "won"),
    ("woman", "women"), ("write", "wrote written"),
)}


_VOWELS = set("aeiou")


def word_forms(word: str) -> set[str]:
    """The forms of ``word`` that count as using it: itself, its regular plural or third person, past tense and
    -ing form (with the spelling changes: "drive" → "driving", "cry" → "cried", "sled" → "sledding", "shelf" →
    "shelves", "fisherman" → "fishermen"), and its irregular forms (``IRREGULAR_FORMS``). Lowercase."""
    w = word.lower()
    forms = {w, *IRREGULAR_FORMS.get(w, ())}
    consonant_y = len(w) > 1 and w.endswith("y") and w[-2] not in _VOWELS
    # plural or third person
    if w.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(w + "es")
    elif consonant_y:
        forms.add(w[:-1] + "ies")
    else:
        forms |= {w + "s", w + "es"} if w.endswith("o") else {w + "s"}
    # past tense (a word with irregular forms has no regular one: "see" is not "seed") and -ing
    regular_past = w not in IRREGULAR_FORMS
    if w.endswith("e"):
        forms |= {w + "ing" if w.endswith(("ee", "ye", "oe")) else w[:-1] + "ing", *([w + "d"] if regular_past else [])}
    else:
        forms |= {w + "ing", *([w[:-1] + "ied" if consonant_y else w + "ed"] if regular_past else [])}
    if len(w) > 2 and w[-1] not in _VOWELS | set("wxy") and w[-2] in _VOWELS and w[-3] not in _VOWELS:  # "sled" → "sledding"
        forms |= {w + w[-1] + "ing", w + w[-1] + "ed"}
    if w.endswith("fe"):
        forms.add(w[:-2] + "ves")
    elif w.endswith("f"):
        forms.add(w[:-1] + "ves")
    if w.endswith("man"):
        forms.add(w[:-3] + "men")
    return forms


def keyword_coverage(text: str, words: list[str]) -> float:
    """Fraction of ``words`` found in ``text`` as whole words, in any of their forms (``word_forms``; case-insensitive).

    An evaluation measure, as a reader counts, so that baselines' natural inflections ("threw", "cried") count too;
    :class:`LexiconReward` pays for the word, its irregular forms and the regular ones its tokenizer spells as the word
    and a glued ending."""
    if not words:
        return 0.0
    found = 0
    for word in words:
        forms = sorted(word_forms(word), key=len, reverse=True)
        pattern = re.compile(rf"\b(?:{'|'.join(map(re.escape, forms))})\b", re.IGNORECASE)
        found += bool(pattern.search(text))
    return found / len(words)
