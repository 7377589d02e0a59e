"""Baselines behind the same interface as SEA: plain samples, Best-of-N, ARGS and chunk-level beam search.

All of them score their final answer exactly (``E = −[log pi_ref + alpha·r]``) and charge every LM
token-pass they run to the request's usage, so that methods can be compared at equal compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator

import torch

from app.engine.energy import REFERENCE, drawn_log_probs, evaluate, evaluate_in_chunks, passes_per_row, runs_in_reference_pass
from app.engine.host import to_host
from app.engine.sampling import SampleGroup, categorical, drawing_groups, joined_samples, row_chunks, rows_per_pass
from app.engine.types import AlignResult, ChainResult, StepStats, best_chain
from models.kv import cache_over, stack_prefixes
from models.lm import next_token_log_probs

SAMPLE_BATCH = 32  # Best-of-N draws and scores its candidates this many at a time


def baseline_run(engine, state) -> Generator[None, None, AlignResult | None]:
    """A baseline request's run, as a generator that pauses after each token it draws (and between its Best-of-N
    passes and beam-search chunks) so that the engine can step other requests between them; it returns the result, or
    None once its job is abandoned (checked between tokens and draws)."""
    method = state.config.method
    if method == "args":
        return run_args(engine, state)
    if method == "cbs":
        return run_cbs(engine, state)
    return run_best_of_n(engine, state)


def _padded(engine, state, tokens: torch.Tensor) -> torch.Tensor:
    length = state.config.max_tokens
    return torch.nn.functional.pad(tokens, (0, length - tokens.shape[0]), value=engine.pad_id)[:length]


def _chains(engine, tokens: torch.Tensor, scores: torch.Tensor) -> list[ChainResult]:
    """Scored full-length responses ``(n, L)`` as chains; ``scores`` ``(n, 3)``: each one's energy, reward and
    log_prob_ref. One read from the device for them all."""
    ids, figures = to_host(tokens, scores)
    chains = []
    for row, (energy, reward, log_prob_ref) in zip(ids, figures):
        stats = StepStats(energy, reward, log_prob_ref, 0.0, math.isfinite(energy))
        text, counted, _ = engine.text.response(row)
        chains.append(ChainResult(text, row, reward, log_prob_ref, energy, 0, stats, [], counted))
    return chains


def _scores(scored) -> torch.Tensor:
    """An evaluation's (n, 3) energy, reward and log_prob_ref, as ``_chains`` takes them."""
    return torch.stack([scored.energy, scored.reward, scored.log_prob_ref], dim=1)


def _decoded_rewards(spec, model) -> list[tuple[object, object]]:
    """The reward components that are ``model`` under a prompt of their own (the principle), with that prompt: a
    decoding can run them beside the reference, one row each, and score its tokens from their next-token log-probs."""
    return [(component, context) for component, _, context in spec.reward_terms if runs_in_reference_pass(component, model)]


@torch.inference_mode()  # entered at each resumption of the generator and left at each pause
def run_args(engine, state) -> Generator[None, None, AlignResult | None]:
    """ARGS (Khanov et al., ICLR 2024): each token is picked among the reference top-k by ``log pi_ref + w·r(x, y_≤t)``.

    ``w`` is ``alpha``; greedy (``temperature = 0``) or sampled from the softmax of the scores. The reference and every
    reward that is the reference network under its own prompt (the principle) decode side by side, one row each,
    feeding the chosen token: their next-token log-probs score all k candidates exactly, with no pass per candidate
    (such a reward is a function of per-token log-probs). Other rewards score each candidate's t + 1 tokens (a reward
    model runs them; a word list is free).
    """
    config = state.config
    spec = state.spec
    model = engine.lm.model
    weight = config.alpha if config.use_reward else 0.0
    joined = _decoded_rewards(spec, model) if weight else []
    scorers = [REFERENCE, *(component for component, _ in joined)]  # row i of the decoding: scorer i's log-probs
    batch = stack_prefixes([spec.prefix, *(context for _, context in joined)])
    cache = cache_over(batch.keys, batch.values)
    mask = batch.mask
    log_probs = batch.first_log_probs  # (scorers, V)
    tokens: list[int] = []
    chosen_log_probs: list[torch.Tensor] = []  # per token, (scorers,): each scorer's log-prob of the token picked
    stops = engine.text.stop_ids
    device = engine.device
    for t in range(config.max_tokens):
        if t:
            yield
        if state.job.is_abandoned():
            return None
        top = log_probs[0].topk(min(config.args_top_k, log_probs.shape[-1]))
        k = top.indices.shape[0]
        if weight:
            candidates = torch.cat([torch.tensor(tokens, dtype=torch.long, device=device).expand(k, t), top.indices[:, None]], dim=1)
            so_far = torch.stack(chosen_log_probs, dim=1) if tokens else log_probs.new_zeros(len(scorers), 0)  # (scorers, t)
            known = {scorer: torch.cat([so_far[i].expand(k, t), log_probs[i, top.indices][:, None]], dim=1) for i, scorer in enumerate(scorers)}
            partial = dataclasses.replace(spec, rows=k, length=t + 1)
            rewards = evaluate_in_chunks(engine.lm, [partial], engine.stop_ids, candidates, known=known).reward
            state.usage.forward_token_passes += passes_per_row(partial, known=frozenset(known)) * k
        else:
            rewards = torch.zeros_like(top.values)
        scores = top.values + weight * rewards
        if config.temperature <= 0:
            pick = int(scores.argmax())
        else:
            pick = int(categorical(torch.softmax(scores / config.temperature, -1)[None], state.generator)[0])
        token = int(top.indices[pick])
        tokens.append(token)
        chosen_log_probs.append(log_probs[:, token])
        if token in stops or t == config.max_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(len(scorers), 1, dtype=mask.dtype, device=device)], dim=1)
        log_probs = next_token_log_probs(model, torch.full((len(scorers), 1), token, device=device), mask,
                                         (batch.lengths + t)[:, None], cache)
        state.usage.forward_token_passes += len(scorers)
    # The decoding computed every token's log-prob under each of its scorers: scoring the answer runs only the others.
    answer = _padded(engine, state, torch.tensor(tokens, dtype=torch.long, device=device))[None]
    drawn = torch.nn.functional.pad(torch.stack(chosen_log_probs, dim=1), (0, answer.shape[1] - len(tokens)))
    known = {scorer: drawn[i : i + 1] for i, scorer in enumerate(scorers)}
    full = dataclasses.replace(spec, rows=1)
    scored = evaluate(engine.lm, [full], engine.stop_ids, answer, known=known)
    state.usage.forward_token_passes += passes_per_row(full, known=frozenset(known))
    return engine.finish(state, _chains(engine, answer, _scores(scored)), 0, "args")


@torch.inference_mode()
def run_cbs(engine, state) -> Generator[None, None, AlignResult | None]:
    """Chunk-level beam search (Zhou et al., 2024, weak-to-strong search): W beams, K sampled successors of C tokens each.

    After each chunk the W best distinct partial responses by reward stay. A finished beam (ended by a stop token)
    carries over as it is, once, with its reward: it draws no successors. Each open beam's tokens run once and its
    K successors share them. The draw runs its tokens under the reference and under each reward of the reference
    network (the principle's prompt), so a candidate's log-probs by those scorers are known (a beam's from the chunks
    before) and its scoring runs only the other rewards' passes.
    """
    config = state.config
    width, successors, chunk = config.beams, config.successors, config.chunk
    device = engine.device
    model = engine.lm.model
    joined = _decoded_rewards(state.spec, model)
    scorers = [REFERENCE, *(component for component, _ in joined)]
    beams = torch.zeros(1, 0, dtype=torch.long, device=device)
    beam_log_probs = torch.zeros(1, len(scorers), 0, device=device)  # (W, scorers, t) each beam token's log-probs
    beam_rewards = torch.zeros(1, device=device)
    beam_scores = torch.zeros(1, 3, device=device)  # (W, 3) each beam's exact energy, reward and log pi_ref
    stops = engine.stop_ids
    while beams.shape[1] < config.max_tokens:
        if beams.shape[1]:
            yield
        size = min(chunk, config.max_tokens - beams.shape[1])
        finished = torch.isin(beams, stops).any(1)
        if bool(finished.all()):
            break
        growing = ~finished
        parents = beams[growing]
        group = SampleGroup(state.spec.prefix, parents.shape[0] * successors, size, state.generator, config.temperature, config.top_p,
                            scored_by=tuple(context for _, context in joined), abandoned=state.job.is_abandoned)
        # per parent: K successors under each prompt, beside its own tokens
        per_parent = (successors * len(group.prompts), max(p.length for p in group.prompts), parents.shape[1] + size)
        parts = []
        for _, first, end in (piece for passes in row_chunks([(parents.shape[0], *per_parent)]) for piece in passes):
            part = dataclasses.replace(group, n=(end - first) * successors)
            parts.append((yield from drawing_groups(model, [part], stops, given=parents[first:end], given_repeats=successors))[0])
            if state.job.is_abandoned():
                return None
        samples = joined_samples(parts)
        state.usage.forward_token_passes += samples.forward_token_passes
        candidates = samples.tokens  # (open beams·K, t + C)
        log_probs = torch.cat([beam_log_probs[growing].repeat_interleave(successors, dim=0), samples.token_log_probs], dim=2)
        known = {scorer: log_probs[:, i] for i, scorer in enumerate(scorers)}
        spec = dataclasses.replace(state.spec, rows=candidates.shape[0], length=candidates.shape[1])
        scored = evaluate_in_chunks(engine.lm, [spec], stops, candidates, known=known)
        state.usage.forward_token_passes += passes_per_row(spec, known=frozenset(known)) * spec.rows
        rewards = torch.where(torch.isfinite(scored.energy), scored.reward, torch.full_like(scored.reward, -math.inf))
        scores = _scores(scored)
        if bool(finished.any()):  # padded with stop tokens, which neither the reward nor the reference counts
            padding = torch.full((int(finished.sum()), size), int(stops[0]), dtype=torch.long, device=device)
            candidates = torch.cat([candidates, torch.cat([beams[finished], padding], dim=1)])
            log_probs = torch.cat([log_probs, torch.nn.functional.pad(beam_log_probs[finished], (0, size))])
            rewards = torch.cat([rewards, beam_rewards[finished]])
            scores = torch.cat([scores, beam_scores[finished]])
        kept = _best_distinct(candidates, rewards, width)
        beams, beam_log_probs, beam_rewards, beam_scores = candidates[kept], log_probs[kept], rewards[kept], scores[kept]
    # Each answer was scored exactly when its last chunk was (a finished beam's tokens past its stop count for nothing).
    chains = _chains(engine, torch.stack([_padded(engine, state, beam) for beam in beams]), beam_scores)
    chosen = best_chain(chains, "reward")
    return engine.finish(state, chains, chosen, "cbs")


def _best_distinct(candidates: torch.Tensor, rewards: torch.Tensor, width: int) -> list[int]:
    """Indices of the ``width`` best rows by reward, each token sequence once (K successors that all stopped at once
    are one sequence, and would otherwise fill every beam)."""
    kept, seen = [], set()
    for index in torch.argsort(rewards, descending=True, stable=True).tolist():
        key = tuple(candidates[index].tolist())
        if key not in seen:
            seen.add(key)
            kept.append(index)
            if len(kept) == width:
                break
    return kept


@torch.inference_mode()
def run_best_of_n(engine, state) -> Generator[None, None, AlignResult | None]:
    """``sample``: one draw from pi_ref. ``bon``: N draws, the best by reward (or by exact energy with ``select``)."""
    config = state.config
    total = 1 if config.method == "sample" else config.samples
    chains: list[ChainResult] = []
    batch = min(SAMPLE_BATCH, rows_per_pass(1, state.spec.prefix.length, config.max_tokens))  # long prompts: fewer
    for start in range(0, total, batch):
        if start:
            yield
        n = min(batch, total - start)
        group = SampleGroup(state.spec.prefix, n, config.max_tokens, state.generator, config.temperature, config.top_p,
                            abandoned=state.job.is_abandoned)
        samples = (yield from drawing_groups(engine.lm.model, [group], engine.stop_ids))[0]  # pausing between tokens
        if state.job.is_abandoned():
            return None
        spec = dataclasses.replace(state.spec, rows=n)
        known = drawn_log_probs(samples.token_log_probs, None)  # the reference's log-probs come with the draw
        scored = evaluate_in_chunks(engine.lm, [spec], engine.stop_ids, samples.tokens, known=known)
        state.usage.forward_token_passes += samples.forward_token_passes + passes_per_row(spec, known=frozenset(known)) * n
        chains += _chains(engine, samples.tokens, _scores(scored))
    chosen = best_chain(chains, config.select)
    return engine.finish(state, chains, chosen, config.method)
