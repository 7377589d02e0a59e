"""A reward model: a ``*ForSequenceClassification`` network that shares the reference's vocabulary, fed the same soft
one-hots, read where transformers reads it (the last token that is not padding)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from models.kv import Prefix, stack_prefixes, with_cache
from models.lm import embedding_scale, encode_prefix, forward_after_prefix, probe_sequence
from models.loading import (
    LoadedLM,
    ModelLoadError,
    refuse_missing_weights,
    refuse_unfaithful_scoring,
    resolve_device,
    resolve_dtype,
)
from models.rewards.base import Prompt, RewardComponent
from models.ste import ResponseBatch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class SequenceClassifierReward(RewardComponent):
    """Any ``AutoModelForSequenceClassification`` reward model sharing the reference vocabulary, fed embeddings.

    The score is the head's first output where transformers pools it for the prompt and the response up to its end
    (the end-of-turn token included): at the last token that is not the model's padding token (a model whose padding
    token is its end-of-turn token, as many chat models', is scored before it), or the last token without one.
    """

    def __init__(self, model: PreTrainedModel, name: str):
        self.model = model
        self.name = name
        self.lm_passes = 1
        self.backbone = getattr(model, model.base_model_prefix)
        self.head = model.score if hasattr(model, "score") else model.get_output_embeddings()
        self.pad_id = model.config.get_text_config().pad_token_id

    def prepare(self, prompt: Prompt) -> object:
        return self._encode(prompt.ids)

    def _encode(self, ids: list[int]) -> Prefix:
        # keeps where a response of padding tokens only is pooled: the prompt's last token that is not one (as transformers)
        kept = [i for i, token in enumerate(ids) if token != self.pad_id]
        return encode_prefix(self.model, ids, with_lm_head=False, hidden_at=kept[-1] if kept else 0)

    @torch.no_grad()
    def scoring_error(self, vocab: int, length: int = 12) -> float:
        """How far this reward's score of a short sequence (half of it a cached prompt) is from the model's own."""
        ids, cut = probe_sequence(self.model, vocab, length)
        cache = DynamicCache()  # the prompt cached on both sides: bf16 rounds a fresh pass differently
        self.model(input_ids=ids[None, :cut], use_cache=True, **with_cache(self.model, cache))
        own = self.model(input_ids=ids[None, cut:], use_cache=True, **with_cache(self.model, cache)).logits[0, 0].float()
        response = ResponseBatch(ids[None, cut:], torch.ones(1, length - cut, device=ids.device))
        got = self.score([self._encode(ids[:cut].tolist())], response)[0]
        return float((got - own).abs())

    def score(self, contexts: list[object], response: ResponseBatch) -> Tensor:
        embeds = response.embed(self.model.get_input_embeddings().weight, scale=embedding_scale(self.model))
        hidden, _ = forward_after_prefix(self.backbone, stack_prefixes(contexts), embeds)  # (B, L, d)
        pooled_at = response.mask.bool()  # causal: the positions after the response's end cannot leak in
        if self.pad_id is not None:
            pooled_at &= response.tokens != self.pad_id
        positions = torch.arange(response.length, device=hidden.device)
        last = (positions * pooled_at).argmax(1)  # the rightmost pooled position (0 when there is none)
        pooled = hidden[torch.arange(response.rows, device=hidden.device), last]
        in_prompt = torch.stack([context.hidden for context in contexts]).to(pooled.dtype)  # a response of padding only
        pooled = torch.where(pooled_at.any(1, keepdim=True), pooled, in_prompt)
        return self.head(pooled)[:, 0].float()


def load_sequence_classifier_reward(
    source: str, reference: LoadedLM, *, device: str = "auto", dtype: str = "auto", name: str | None = None
) -> SequenceClassifierReward:
    """Load a reward model and check that it shares the reference vocabulary (refuses otherwise, naming both sizes)."""
    torch_device = resolve_device(device)
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=resolve_dtype(dtype, torch_device), output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the reward model {source!r} (SEA_REWARD_MODEL): {exc}") from exc
    if not hasattr(model, "score") or model.config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"reward model {source} ({type(model).__name__}) is not a decoder with a `score` head: SEA scores "
                             "a response after the prompt's cached keys and values, which needs a causal (decoder-only) model")
    refuse_missing_weights(source, loading, "a sequence-classification (reward model)")
    if model.score.out_features != 1:
        raise ModelLoadError(f"reward model {source} has {model.score.out_features} outputs (num_labels); a reward is one number")
    tokenizer = None
    folder = Path(source).expanduser()
    # A folder without tokenizer files: transformers would make up a placeholder tokenizer, which the check below
    # would then refuse as a different one; the embedding's size is checked all the same.
    if not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            tokenizer = None
    check_shared_vocabulary(model, tokenizer, reference)
    model.to(torch_device).eval().requires_grad_(False)
    reward = SequenceClassifierReward(model, name or source)
    refuse_unfaithful_scoring(f"reward model {source}", model,
                              reward.scoring_error(min(model.get_input_embeddings().weight.shape[0], len(reference.tokenizer))))
    return reward


def check_shared_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, reference: LoadedLM) -> None:
    """Raise :class:`ModelLoadError` unless embeddings and tokenizer match the reference LM's."""
    rows = model.get_input_embeddings().weight.shape[0]
    ref_rows = reference.model.get_input_embeddings().weight.shape[0]
    if rows != ref_rows:
        raise ModelLoadError(
            f"reward model vocabulary size {rows} does not match the reference model's {ref_rows}: "
            "SEA feeds both models the same token embeddings, so they must share one tokenizer"
        )
    if tokenizer is not None and tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise ModelLoadError(
            f"reward tokenizer ({len(tokenizer)} tokens) differs from the reference tokenizer "
            f"({len(reference.tokenizer)} tokens): they must be the same"
        )
