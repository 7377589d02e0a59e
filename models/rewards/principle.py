"""The principle reward: how much more likely a response is under the reference LM with a principle before the
prompt than without it, per token clipped, with runs that copy the principle's own words paid nothing."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from models.defaults import COPY_TOKENS, PRINCIPLE_CLIP, SAFETY_PRINCIPLE
from models.kv import stack_prefixes
from models.lm import encode_prefix, response_token_log_probs
from models.loading import LoadedLM
from models.rewards.base import Prompt, RewardComponent
from models.ste import ResponseBatch, masked_sum
from models.tokens import render_prompt


def copy_grams(tokenizer: PreTrainedTokenizerBase, text: str, n: int = COPY_TOKENS) -> Tensor:
    """Every run of ``n`` consecutive tokens of ``text`` ``(G, n)``, as it tokenises at the start of a turn or
    mid-sentence, capitalised or not."""
    grams = set()
    for variant in {text, " " + text, text.lower(), " " + text.lower()}:
        ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
        grams.update(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return torch.tensor(sorted(grams), dtype=torch.long).reshape(-1, n)


def copied_positions(tokens: Tensor, grams: Tensor) -> Tensor:
    """``(B, L)`` bool: positions inside a run of ``n`` tokens that equals one of ``grams`` ``(G, n)``."""
    n = grams.shape[1]
    if tokens.shape[1] < n or grams.shape[0] == 0:
        return torch.zeros_like(tokens, dtype=torch.bool)
    windows = tokens.unfold(1, n, 1)  # (B, L - n + 1, n)
    starts = (windows[:, :, None, :] == grams.to(tokens.device)[None, None]).all(-1).any(-1)  # (B, L - n + 1)
    covered = torch.zeros_like(tokens, dtype=torch.bool)
    for offset in range(n):  # a window starting at s covers s … s + n − 1
        covered[:, offset : offset + starts.shape[1]] |= starts
    return covered


def copy_completions(history: Tensor, grams: Tensor, vocab: int) -> Tensor:
    """``(B, V)`` bool: the next tokens that would complete a copied run of ``grams`` after ``history`` ``(B, t)``."""
    n = grams.shape[1]
    if history.shape[1] < n - 1 or grams.shape[0] == 0:
        return torch.zeros(history.shape[0], vocab, dtype=torch.bool, device=history.device)
    grams = grams.to(history.device)
    hits = (history[:, None, -(n - 1) :] == grams[None, :, : n - 1]).all(-1)  # (B, G)
    # Scattered, not indexed by the hits' positions (nonzero): that reads the device, once a decoded token.
    completions = torch.zeros(history.shape[0], vocab, device=history.device)
    return completions.scatter_reduce_(1, grams[:, -1].expand_as(hits), hits.float(), "amax") > 0


def limited_log_probs(log_probs: Tensor, ref: Tensor, history: Tensor, clip: float, grams: Tensor) -> Tensor:
    """Next-token log-probs ``(B, V)`` under a contrastive reward's prompt, limited as that reward limits what a token
    earns: at most ``ref + clip``, and ``ref`` itself for a token that would complete a copied run of ``grams``."""
    log_probs = torch.minimum(log_probs, ref + clip)
    return torch.where(copy_completions(history, grams, ref.shape[-1]), ref, log_probs)


class PrincipleReward(RewardComponent):
    """Contrastive principle reward ``Σ_t min(log pi(y_t | principle, x, y_<t) − log pi(y_t | x, y_<t), clip)`` with
    the reference LM itself, over the tokens that do not copy the principle.

    With ``clip = inf`` and no copies, at ``alpha = 1`` the SEA target is exactly the principle-prompted model.
    The two limits are there because a prompt primes its own words: with the principle in its context a small LM
    predicts the principle's words several nats more surely, whatever they say, so at larger alpha reciting the
    system prompt is the cheapest way to a high reward (we measured it: SEA answers that quote the principle at
    −4 nats per token under the reference). A token inside a run of ``COPY_TOKENS`` tokens that repeats the
    principle earns nothing, and no token earns more than ``clip`` nats (a near-copy broken up by junk tokens
    still gains 4–8 nats on each principle word; a refusal's tokens gain well under 2).

    Reuses the reference log-prob the engine has already computed, so it costs one extra LM pass, not two; and
    since it reads the reference network (``model``, under its own prompt: the contexts are prefixes), the engine
    runs it in the reference's own forward pass and hands it the per-token log-probs (``from_log_probs``).
    """

    def __init__(self, lm: LoadedLM, principle: str = SAFETY_PRINCIPLE, name: str = "principle", clip: float = PRINCIPLE_CLIP):
        self.lm = lm
        self.clip = clip
        self.model = lm.model
        self.principle = principle
        self.name = name
        self.lm_passes = 1
        self.next_token = True
        self.resumes = True
        self.contrastive = True
        self.copy_grams = copy_grams(lm.tokenizer, principle).to(lm.device)

    def prepare(self, prompt: Prompt) -> object:
        return encode_prefix(self.lm.model, render_prompt(self.lm.tokenizer, prompt.messages, system=self.principle))

    def score(self, contexts: list[object], response: ResponseBatch) -> Tensor:
        return self.from_log_probs(response_token_log_probs(self.lm.model, stack_prefixes(contexts), response, key=self), response)

    def limit_candidates(self, log_probs: Tensor, ref: Tensor, history: Tensor) -> Tensor:
        """What each next token ``(B, V)`` after ``history`` ``(B, t)`` earns here, as the reward below limits it."""
        return limited_log_probs(log_probs, ref, history, self.clip, self.copy_grams)

    def from_log_probs(self, token_log_probs: Tensor, response: ResponseBatch) -> Tensor:
        """The reward from ``log pi(y_t | principle, x, y_<t)`` ``(B, L)``."""
        counts = response.mask * ~copied_positions(response.tokens, self.copy_grams)
        return masked_sum((token_log_probs - response.token_log_prob_ref).clamp(max=self.clip), counts)
