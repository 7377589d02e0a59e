"""What every reward is: a component prepared once per prompt and scoring any number of responses to it
(:class:`RewardComponent`), the prompt it is prepared for, and a weighted mix of components (:class:`RewardMix`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from models.ste import ResponseBatch
from models.tokens import Message


@dataclass
class Prompt:
    """One request's prompt: the chat messages and their rendering by the reference tokenizer."""

    messages: list[Message]
    ids: list[int]


class RewardComponent(Protocol):
    """A reward. A component may also set ``resumes = True`` when ``score`` reads ``response.reuse`` (scores an
    edit from its first edited position on, at that lower cost); without it an edit costs a full pass. One that
    scores the response's next-token log-probs under its own prompt sets ``next_token = True``: like the reference,
    it runs only the first L − 1 tokens (for compute accounting). It may set
    ``contrastive = True`` when its score is ``log pi(y | context) − log pi_ref(y | x)`` for ``model`` and a
    prefix context: each token's share of it is then known as the token is drawn, so guided starts tilt by it. A
    contrastive component that limits what a token earns gives ``limit_candidates(log_probs, ref, history)``
    (next-token log-probs under its context, limited the same way), which guided starts draw by; with
    ``from_log_probs(token_log_probs, response)`` (the score from the drawn tokens' log-probs under its context) a
    drawn sample is scored from its draw, without another pass. A component that pays for token sequences as a
    whole may give ``phrases()`` (per word, its spellings of two or more tokens), which the discrete update's
    phrase moves write whole."""

    name: str
    lm_passes: int  # LM passes per response token that ``score`` runs (for compute accounting)

    def prepare(self, prompt: Prompt) -> object:
        """Per-prompt state, computed once and passed back to ``score`` for each row of that prompt."""

    def score(self, contexts: list[object], response: ResponseBatch) -> Tensor:
        """Reward per row ``(B,)`` float32; differentiable in ``response.probs`` when those are given."""


@dataclass
class RewardMix:
    """A weighted sum of reward components: ``r = Σ_i weight_i · r_i``."""

    terms: list[tuple[RewardComponent, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("a reward needs at least one component")

    def phrases(self) -> list[list[tuple[int, ...]]]:
        """The multi-token words that components with a positive weight pay for as a whole (``phrases()``)."""
        return [words for component, weight in self.terms if weight > 0 and hasattr(component, "phrases") for words in component.phrases()]
