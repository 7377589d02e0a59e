"""What every reward is: a component prepared once per prompt and scoring any number of responses to it
(:class:`RewardComponent`), the prompt it is prepared for, and a weighted mix of components (:class:`RewardMix`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor
from transformers import PreTrainedModel

from models.ste import ResponseBatch
from models.tokens import Message


@dataclass
class Prompt:
    """One request's prompt: the chat messages and their rendering by the reference tokenizer."""

    messages: list[Message]
    ids: list[int]


class RewardComponent:
    """A reward: prepared once per prompt (``prepare``), then scoring any number of responses to it (``score``). The
    class attributes say what else a component offers the engine; each defaults to "nothing more"."""

    name: str = "reward"
    lm_passes: int = 0  # LM passes per response token that ``score`` runs (for compute accounting)
    model: PreTrainedModel | None = None  # the network ``score`` runs, if any
    # ``score`` reads ``response.reuse``: an edit is scored from its first edited position on, at that lower cost
    # (without it an edit costs a full pass).
    resumes: bool = False
    # ``score`` reads the response's next-token log-probs under its own prompt: like the reference, it runs only the
    # first L − 1 tokens (for compute accounting).
    next_token: bool = False
    # The score is ``log pi(y | context) − log pi_ref(y | x)`` for ``model`` and a prefix context: each token's share
    # is known as the token is drawn, so guided starts tilt by it.
    contrastive: bool = False
    # A contrastive component that limits what a token earns: ``limit_candidates(log_probs, ref, history)`` gives the
    # next-token log-probs under its context limited the same way, which guided starts draw by.
    limit_candidates: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    # ``from_log_probs(token_log_probs, response)``: the score from the drawn tokens' log-probs under its context, so
    # a drawn sample is scored from its draw, without another pass.
    from_log_probs: Callable[[Tensor, ResponseBatch], Tensor] | None = None

    def prepare(self, prompt: Prompt) -> object:
        """Per-prompt state, computed once and passed back to ``score`` for each row of that prompt."""
        raise NotImplementedError

    def score(self, contexts: list[object], response: ResponseBatch) -> Tensor:
        """Reward per row ``(B,)`` float32; differentiable in ``response.probs`` when those are given."""
        raise NotImplementedError

    def phrases(self) -> list[list[tuple[int, ...]]]:
        """Per word the component pays for as a whole, its spellings of two or more tokens, which the discrete update's
        phrase moves write whole (none by default)."""
        return []


@dataclass
class RewardMix:
    """A weighted sum of reward components: ``r = Σ_i weight_i · r_i``."""

    terms: list[tuple[RewardComponent, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("a reward needs at least one component")

    def phrases(self) -> list[list[tuple[int, ...]]]:
        """The multi-token words that components with a positive weight pay for as a whole (``phrases()``)."""
        return [words for component, weight in self.terms if weight > 0 for words in component.phrases()]
