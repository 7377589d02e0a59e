"""Builds the resident models, rewards and engine from the settings, and turns prompts into engine jobs."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from jinja2.exceptions import TemplateError

from app.engine.sea import Engine
from app.engine.types import AlignJob, SEAConfig
from app.settings import Settings
from models.defaults import KEYWORD_WEIGHT
from models.loading import LoadedLM, compile_forward, load_lm
from models.rewards import (
    LexiconReward,
    PrincipleReward,
    Prompt,
    RewardComponent,
    RewardMix,
    load_sequence_classifier_reward,
)
from models.tokens import Message, TokenText, prepare_text_encoders, render_prompt

log = logging.getLogger(__name__)


class UnknownRewardError(ValueError):
    """A request named a reward that is not loaded."""


class PromptError(ValueError):
    """Messages the model cannot take: its chat template refuses them (e.g. roles that do not alternate), or they spell
    a token its embedding has no row for (a tokenizer larger than the model by design, as Gemma 3's)."""


class UnspellableKeywordsError(ValueError):
    """None of a request's keywords can be written with the model's vocabulary."""


@dataclass
class Runtime:
    """Everything resident: the reference LM, its engine and the named reward components."""

    lm: LoadedLM
    engine: Engine
    rewards: dict[str, RewardComponent]
    default_reward: list[tuple[str, float]]
    keyword_weight: float = KEYWORD_WEIGHT

    @classmethod
    def from_lm(cls, lm: LoadedLM, settings: Settings, extra_rewards: dict[str, RewardComponent] | None = None) -> Runtime:
        rewards: dict[str, RewardComponent] = {"principle": PrincipleReward(lm, settings.principle, clip=settings.principle_clip)}
        rewards.update(extra_rewards or {})
        runtime = cls(lm, Engine(lm), rewards, settings.reward_terms(), settings.default_keyword_weight)
        runtime.longest_token_characters  # noqa: B018 (computed now, not on a request)
        prepare_text_encoders(lm.tokenizer)
        for name, _ in runtime.default_reward:
            if name not in rewards:
                raise UnknownRewardError(f"SEA_REWARD names {name!r}, but the loaded rewards are {sorted(rewards)}")
        return runtime

    @property
    def text(self) -> TokenText:
        """The text of token ids: responses' (up to their stop token), token pieces, decoding."""
        return self.engine.text

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Load the configured models (the embedded default when none is set)."""
        if settings.threads:
            torch.set_num_threads(settings.threads)
        lm = load_lm(settings.model or None, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir or None)
        log.info("reference model %s on %s (%s)", lm.name, lm.device, lm.dtype)
        if settings.compile:
            compile_forward(lm)  # falls back to eager with a warning when compiling fails
        extra = {}
        if settings.reward_model:
            extra["rm"] = load_sequence_classifier_reward(settings.reward_model, lm, device=settings.device, dtype=settings.dtype, name="rm")
            log.info("reward model %s loaded as `rm`", settings.reward_model)
        return cls.from_lm(lm, settings, extra)

    def context_check(self, job: AlignJob) -> tuple[int, int | None]:
        """The most positions a job's sequences take (its prompt, or a principle's, which puts the principle first,
        and the response), and the fewest a model it runs was trained for (None: not known). Past it, a rotary model
        reads positions it never saw and one with learned positions fails."""
        prompts = [len(job.prompt.ids)] + [len(render_prompt(self.lm.tokenizer, job.prompt.messages, system=component.principle))
                                           for component, _ in job.reward.terms if isinstance(component, PrincipleReward)]
        models = [self.lm.model] + [component.model for component, _ in job.reward.terms if component.model is not None]
        limits = [limit for model in models if isinstance(limit := getattr(model.config, "max_position_embeddings", None), int)]
        return max(prompts) + job.config.max_tokens, min(limits, default=None)

    def prompt_error(self, job: AlignJob, max_prompt_tokens: int) -> str | None:
        """Why ``job``'s prompt cannot run (past ``max_prompt_tokens``, or with its response past a model's context),
        if it cannot."""
        if len(job.prompt.ids) > max_prompt_tokens:
            return f"the prompt has {len(job.prompt.ids)} tokens; the limit is {max_prompt_tokens}"
        needed, context = self.context_check(job)
        if context is not None and needed > context:
            return (f"the prompt and the response need {needed} positions; the model's context is {context} "
                    "(shorten the prompt or ask for fewer response tokens)")
        return None

    @functools.cached_property
    def longest_token_characters(self) -> int:
        """Characters of the vocabulary's longest token (81 for SmolLM2: a newline and 80 spaces), as text or as spelt in
        the vocabulary (a SentencePiece "▁" is a space the text drops): a text longer than n times this is sure to take
        more than n tokens (for tokenizers without an unknown-word token)."""
        tokenizer = self.lm.tokenizer
        return max(max(len(token), len(tokenizer.convert_tokens_to_string([token]))) for token in tokenizer.get_vocab())

    def prompt(self, messages: list[Message]) -> Prompt:
        """The chat rendered by the model's template and tokenized; a :class:`PromptError` when the template refuses it
        or it holds tokens the model has no embedding for."""
        try:
            ids = render_prompt(self.lm.tokenizer, messages)
        except TemplateError as exc:
            raise PromptError(f"the model's chat template refuses these messages: {exc}") from None
        outside = sorted({token for token in ids if token >= self.embedding_rows})
        if outside:
            pieces = ", ".join(repr(self.lm.tokenizer.convert_ids_to_tokens(token)) for token in outside[:3])
            raise PromptError(f"the prompt holds tokens the model has no embedding for ({pieces})")
        return Prompt(messages, ids)

    @functools.cached_property
    def embedding_rows(self) -> int:
        return int(self.lm.model.get_input_embeddings().weight.shape[0])

    def reward(
        self,
        terms: list[tuple[str, float]] | None = None,
        keywords: list[str] | None = None,
        keyword_weight: float | None = None,
        keywords_only: bool = False,
    ) -> RewardMix:
        """A reward mix of named components plus an optional keyword-coverage term built for this request
        (weighted ``keyword_weight``, by default the server's)."""
        chosen: list[tuple[RewardComponent, float]] = []
        if not (keywords and keywords_only):
            for name, weight in terms if terms is not None else self.default_reward:
                if name not in self.rewards:
                    raise UnknownRewardError(f"unknown reward {name!r}; loaded rewards: {', '.join(sorted(self.rewards))}")
                chosen.append((self.rewards[name], weight))
        if keywords:
            lexicon = LexiconReward.keywords(self.lm.tokenizer, keywords, vocab=min(self.embedding_rows, self.engine.vocab))
            if not lexicon.patterns:  # e.g. only blanks, or words the tokenizer cannot spell: nothing to reward
                raise UnspellableKeywordsError("none of the keywords can be spelled with the model's vocabulary")
            chosen.append((lexicon, self.keyword_weight if keyword_weight is None else keyword_weight))
        return RewardMix(chosen)

    def job(self, messages: list[Message], config: SEAConfig, **reward_options) -> AlignJob:
        """An engine job: the rendered prompt, the config, and the reward the options ask for (:meth:`reward`)."""
        return AlignJob(self.prompt(messages), config, self.reward(**reward_options))
