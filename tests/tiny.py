"""Tiny random models built from configs, with a small word-level tokenizer: the suite runs in seconds; and a count of
the positions models run."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from models.loading import LoadedLM

WORDS = (
    "the a an i you we it is are was be to of and in on for with that this not no yes can cannot will "
    "help sorry here how what why please sure safe harm dog cat frisbee park throw river boat fish net "
    "kitchen knife onion cry sun moon light house lighthouse violin penguin telescope weekend morning "
    "coffee tea water fire run walk play read write sing good bad happy sad big small red blue green "
    "one two three four five , . ! ? : ;"
).split()
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + ["system", "user", "assistant"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small GPT-2-style byte-level BPE tokenizer (as SmolLM2's): characters outside its few merges, an emoji or a
    CJK character, take one token per UTF-8 byte."""
    from tokenizers import trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["hello world cafe " * 3], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def chat_byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with SmolLM2's control tokens and chat template."""
    from tokenizers import trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["hello world, obey the system " * 3], trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                      additional_special_tokens=["<|endoftext|>"])
    wrapped.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return wrapped


def _config(vocab: int, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, bos_token_id=1, pad_token_id=2,
        tie_word_embeddings=True, **extra,
    )


def tiny_lm(seed: int = 0) -> LoadedLM:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(len(tokenizer))).eval().requires_grad_(False)
    # Random init gives near-uniform predictions; sharpen them so sampling and Langevin have structure.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    return LoadedLM(model, tokenizer, "tiny-llama", torch.device("cpu"), torch.float32)


def tiny_reward_model(vocab: int, seed: int = 1) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_config(vocab, num_labels=1)).eval().requires_grad_(False)


def save_tiny_lm(lm: LoadedLM, folder: Path) -> Path:
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def positions_run(*backbones):
    """The positions (rows × tokens) of every forward pass of ``backbones`` while the block runs, in the list it yields."""
    fed: list[int] = []

    def count(module, args, kwargs):
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        fed.append(inputs.shape[:2].numel())

    hooks = [backbone.register_forward_pre_hook(count, with_kwargs=True) for backbone in backbones]
    try:
        yield fed
    finally:
        for hook in hooks:
            hook.remove()
