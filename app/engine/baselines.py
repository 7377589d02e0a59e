"""Sampling baselines behind the same interface as SEA: plain samples and Best-of-N."""

from __future__ import annotations

import dataclasses
import math

import torch

from app.engine.energy import evaluate, passes_per_row
from app.engine.sampling import sample_responses
from app.engine.types import AlignResult, ChainResult, StepStats

SAMPLE_BATCH = 32  # Best-of-N draws and scores its candidates this many at a time


def run_baseline(engine, state) -> AlignResult:
    """``sample``: one draw from pi_ref. ``bon``: N draws, the best by reward (or by exact energy with ``select``)."""
    config = state.config
    total = 1 if config.method == "sample" else config.samples
    chains: list[ChainResult] = []
    with torch.inference_mode():
        for start in range(0, total, SAMPLE_BATCH):
            n = min(SAMPLE_BATCH, total - start)
            samples = sample_responses(
                engine.lm.model, state.spec.prefix, n, config.max_tokens, engine.stop_ids, state.generator,
                config.temperature, config.top_p,
            )
            spec = dataclasses.replace(state.spec, rows=n)
            scored = evaluate(engine.lm, [spec], engine.stop_ids, samples.tokens)
            state.usage.forward_token_passes += samples.forward_token_passes + passes_per_row(spec) * n
            for row in range(n):
                stats = StepStats(float(scored.energy[row]), float(scored.reward[row]), float(scored.log_prob_ref[row]), 0.0,
                                  bool(torch.isfinite(scored.energy[row])))
                text, _, _ = engine.text_of(samples.tokens[row])
                chains.append(ChainResult(text, samples.tokens[row].tolist(), stats.reward, stats.log_prob_ref,
                                          stats.energy, 0, stats, []))
    if config.select == "energy":
        keys = [c.energy if math.isfinite(c.energy) else math.inf for c in chains]
        chosen = min(range(len(chains)), key=keys.__getitem__)
    else:
        keys = [c.reward if math.isfinite(c.energy) else -math.inf for c in chains]
        chosen = max(range(len(chains)), key=keys.__getitem__)
    return engine.finish(state, chains, chosen, config.method)
