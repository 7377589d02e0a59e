"""Reward models behind one interface: score a batch of (straight-through) responses, one scalar per row.

A reward component is prepared once per prompt (``prepare``: e.g. the keys/values of its own prompt)
and then scores any number of responses to that prompt (``score``). Components are combined with
weights in a :class:`RewardMix`; the engine batches each component over all rows that use it.

The components: the principle reward (``principle.py``), a reward model (``classifier.py``), word rewards
(``lexicon.py``); what they share: ``base.py``.
"""

from models.rewards.base import Prompt, RewardComponent, RewardMix
from models.rewards.classifier import SequenceClassifierReward, check_shared_vocabulary, load_sequence_classifier_reward
from models.rewards.lexicon import LexiconReward, WordEdges, keyword_coverage, word_edges, word_forms
from models.rewards.principle import PrincipleReward, copied_positions, copy_completions, copy_grams, limited_log_probs

__all__ = [
    "LexiconReward", "PrincipleReward", "Prompt", "RewardComponent", "RewardMix", "SequenceClassifierReward", "WordEdges",
    "check_shared_vocabulary", "copied_positions", "copy_completions", "copy_grams", "keyword_coverage",
    "limited_log_probs", "load_sequence_classifier_reward", "word_edges", "word_forms",
]
