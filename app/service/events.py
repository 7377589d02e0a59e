"""A job's step events: what the worker publishes after each step (every chain's scores, and its text as token pieces
when the job streams them), and the lighter form an ended job keeps for replays, with the memory that holds."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.engine.sea import Engine
    from app.engine.state import RequestState


def step_event(engine: Engine, state: RequestState, with_pieces: bool) -> dict[str, Any]:
    """The step event of ``state``'s latest step (its start's scores at step 0): each chain's energy, reward, log pi_ref
    (null where not finite: JSON has no NaN) and share of tokens changed; ``with_pieces``, its text as token pieces."""
    chains = []
    for c in range(state.chains):
        stats = state.initial[c] if state.step == 0 else state.traces[c][-1]
        entry = {key: value if math.isfinite(value) else None for key, value in
                 (("energy", stats.energy), ("reward", stats.reward), ("log_prob_ref", stats.log_prob_ref))}
        entry["changed"] = stats.changed
        if with_pieces and state.tokens is not None:
            entry.update(_pieces(engine, state, c))
        chains.append(entry)
    return {"event": "step", "step": state.step, "steps": state.config.steps, "chains": chains}


def _pieces(engine: Engine, state: RequestState, chain: int) -> dict[str, Any]:
    """The chain's current text as token pieces, flagging those that differ from its initial sample."""
    tokens = state.tokens[chain].tolist()
    initial = state.initial_tokens[chain].tolist()
    text, counted, _ = engine.text.response(tokens)
    pieces, changed = [], []
    for position, token in enumerate(tokens[:counted]):
        if token in engine.text.stop_ids:
            break
        pieces.append(engine.text.tokenizer.decode([token]))
        changed.append(token != initial[position])
    return {"text": text, "pieces": pieces, "changed_positions": changed}


PIECE_KEYS = ("pieces", "changed_positions")


def compact_step_events(events: list[dict[str, Any]], best_steps: list[int]) -> dict[int, dict[str, Any]]:
    """The step events of an ended job to store in a lighter form, by their index: each chain keeps its scores and
    its text, and its token pieces only where a replay marks them: at the step its returned text comes from
    (``best_steps``, one per chain; none for a job without a result) and in the last step event. Pieces cost about
    75 bytes per chain, token and step in memory: 60 MB for a job at the default limits, kept for the job's TTL."""
    steps = [i for i, event in enumerate(events) if event["event"] == "step"]
    lighter = {}
    for i in steps[:-1]:
        event = events[i]
        chains = [chain if (k < len(best_steps) and best_steps[k] == event["step"]) or not any(key in chain for key in PIECE_KEYS)
                  else {key: value for key, value in chain.items() if key not in PIECE_KEYS}
                  for k, chain in enumerate(event["chains"])]
        if any(new is not old for new, old in zip(chains, event["chains"])):
            lighter[i] = {**event, "chains": chains}
    return lighter


def held_event_bytes(events: list[dict[str, Any]]) -> int:
    """About the memory a job's step events hold, in bytes, as Python keeps them: ~200 bytes a chain entry and its
    text's characters, ~60 a token piece and 8 a changed-position flag (within 10 % of tracemalloc's count for 16
    chains × 200 steps × 150 tokens: 4.2 MB)."""
    return sum(200 + len(chain.get("text") or "") + 60 * len(chain.get("pieces") or ()) + 8 * len(chain.get("changed_positions") or ())
               for event in events if event["event"] == "step" for chain in event["chains"])
