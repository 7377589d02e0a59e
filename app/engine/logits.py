"""The paper's update: Langevin dynamics over per-position token logits ``y`` (chains × L × V).

A state's logits start around its (base or guided) samples (:func:`start`); its chains are scored at tick 0, and tick k
applies the k-th update ``y ← y − step·direction + noise·ξ`` (direction: Adam or the plain gradient of the energy at the
hard tokens, through the straight-through estimator) and scores the new iterate. The default update is the discrete one
(``discrete.py``); this one is `update: logits`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from app.engine.energy import Evaluation, evaluate, passes_per_row
from app.engine.host import to_host
from app.engine.sampling import sample_responses
from app.engine.starts import start_tilt
from app.engine.state import RequestState
from app.engine.types import StepStats, noise_at

if TYPE_CHECKING:
    from app.engine.sea import Engine

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
INIT_MARGIN = 1.0  # the sampled token's logit sits this far above the LM's best alternative, so argmax(y0) = sample


def start(engine: Engine, state: RequestState) -> None:
    """Initial logits of the paper-literal update: random, or the LM's log-probs around (base or guided) samples."""
    config, rows, generator, usage = state.config, state.chains, state.generator, state.usage
    if config.init == "random":
        logits = torch.randn(rows, config.max_tokens, engine.vocab, generator=generator, device=engine.device)
        tokens = logits.argmax(-1)
    else:
        tilt = start_tilt(engine, state)
        samples = sample_responses(
            engine.lm.model, state.spec.prefix, rows, config.max_tokens, engine.stop_ids, generator,
            config.temperature, config.top_p, keep_log_probs=True, tilt=tilt,
        )
        usage.forward_token_passes += samples.forward_token_passes
        tokens = samples.tokens
        # COLD-style start: the LM's own log-probs, with the sampled token lifted to the top.
        logits = samples.log_probs.clone()  # (C, L, V)
        top = logits.max(-1, keepdim=True).values
        logits.scatter_(-1, tokens[..., None], top + INIT_MARGIN)
    state.logits = logits
    state.initial_tokens = tokens
    state.timings.init = time.perf_counter() - state.started


def tick(engine: Engine, states: list[RequestState]) -> None:
    """One logits update of every state, in one batched forward/backward pass: each state's Langevin update (from the
    gradient its last scoring left), then the new iterates scored, each chain's best tracked."""
    tick_started = time.perf_counter()
    for state in states:
        # A state whose last evaluation failed (out of memory) has no gradient and is simply re-scored.
        if state.grad is not None:
            _update(engine, state)
    need_grad = any(s.needs_grad for s in states)
    evaluation = _evaluate(engine, states, with_grad=need_grad)
    elapsed = time.perf_counter() - tick_started
    offset = 0
    for state in states:
        rows = slice(offset, offset + state.chains)
        offset += state.chains
        _record(engine, state, evaluation, rows, need_grad and state.needs_grad)
        state.timings.langevin += elapsed
        if state.done:
            state.result = engine.result(state)
            state.grad = state.adam_m = state.adam_v = state.logits = None


def _evaluate(engine: Engine, states: list[RequestState], with_grad: bool) -> Evaluation:
    length = max(s.spec.length for s in states)
    tokens, logits, allowed = [], [], []
    top_k = max((s.config.top_k or 0) for s in states) or None
    for state in states:
        y = state.logits
        token_ids = _decode_tokens(engine, state)
        pad = length - y.shape[1]
        if pad:
            y = torch.nn.functional.pad(y, (0, 0, 0, pad))
            token_ids = torch.nn.functional.pad(token_ids, (0, pad), value=engine.pad_id)
        tokens.append(token_ids)
        logits.append(y)
        if top_k:
            allowed.append(_allowed(engine, state, length))
    return evaluate(
        engine.lm,
        [s.spec for s in states],
        engine.stop_ids,
        torch.cat(tokens),
        torch.cat(logits) if with_grad else None,
        torch.cat(allowed) if top_k and with_grad else None,
        top_k=top_k,
    )


def _decode_tokens(engine: Engine, state: RequestState) -> Tensor:
    """Hard tokens of the current iterate: argmax of the logits (within the reference top-k when asked)."""
    if state.step <= 0:
        return state.initial_tokens
    if state.top_k is None:
        return state.logits.argmax(-1)
    candidates = state.top_k[..., : state.config.top_k]  # (C, L, k)
    best = state.logits.gather(-1, candidates).argmax(-1, keepdim=True)
    return candidates.gather(-1, best)[..., 0]


def _allowed(engine: Engine, state: RequestState, length: int) -> Tensor:
    """(C, length, V) mask of the tokens each position may take. Positions past this request's own length (padding
    up to a longer batch mate's) stay all allowed: an all-masked row's softmax is NaN, and NaN times a zero mask
    is still NaN in the reward."""
    allowed = torch.ones(state.chains, length, engine.vocab, dtype=torch.bool, device=engine.device)
    if state.config.top_k and state.top_k is not None:
        own = allowed[:, : state.spec.length]
        own.zero_()
        own.scatter_(-1, state.top_k[..., : state.config.top_k], True)
    return allowed


def _update(engine: Engine, state: RequestState) -> None:
    """One Langevin update of the logits: ``y ← y − step·direction + noise·ξ`` (direction: Adam or plain gradient)."""
    config = state.config
    grad = state.grad
    finite = torch.isfinite(grad).flatten(1).all(1)  # (C,); not read back: the device goes on without waiting
    grad = torch.where(finite[:, None, None], grad, 0.0)
    state.step += 1
    if config.optimizer == "adam":
        if state.adam_m is None:
            state.adam_m = torch.zeros_like(grad)
            state.adam_v = torch.zeros_like(grad)
        beta1, beta2 = ADAM_BETAS
        state.adam_m.mul_(beta1).add_(grad, alpha=1 - beta1)
        state.adam_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = state.adam_m / (1 - beta1**state.step)
        v_hat = state.adam_v / (1 - beta2**state.step)
        direction = m_hat / (v_hat.sqrt() + ADAM_EPS)
    else:
        direction = grad
    state.logits = state.logits - config.step_size * direction
    sigma = noise_at(config, state.step)
    if sigma > 0:
        noise = torch.randn(state.logits.shape, generator=state.generator, device=engine.device)
        state.logits = state.logits + sigma * noise
    state.grad = None


def _record(engine: Engine, state: RequestState, evaluation: Evaluation, rows: slice, had_grad: bool) -> None:
    """Store the scores of the iterate just evaluated; track each chain's best; decide whether it is done."""
    config = state.config
    length = state.spec.length
    tokens = evaluation.tokens[rows, :length]
    mask = evaluation.mask[rows, :length]
    energy, reward, log_prob = evaluation.energy[rows], evaluation.reward[rows], evaluation.log_prob_ref[rows]
    passes = passes_per_row(state.spec) * state.chains
    state.usage.forward_token_passes += passes
    finite = torch.isfinite(energy)
    if had_grad:
        state.usage.backward_token_passes += passes
        state.grad = evaluation.grad[rows, :length]
        finite = finite & torch.isfinite(state.grad).flatten(1).all(1)
    if evaluation.ref_top_k is not None and config.top_k:
        state.top_k = evaluation.ref_top_k[rows, :length]
    state.tokens = tokens
    counted = mask.sum(1).clamp(min=1)
    changed = ((tokens != state.initial_tokens).float() * mask).sum(1) / counted
    first = state.step < 0
    improved = finite if first else finite & (energy < state.lowest_energy)
    better = improved if config.track_best else finite
    (figures,) = to_host(torch.stack([energy, reward, log_prob, changed, finite, improved], 1))  # one read per step
    stats = [StepStats(e, r, p, share, bool(ok)) for e, r, p, share, ok, _ in figures]
    if not all(stat.finite for stat in stats):
        state.nonfinite_steps += 1
    if first:
        state.step = 0
        state.initial = stats
        state.traces = [[] for _ in range(state.chains)]
        state.best_energy = state.lowest_energy = torch.where(finite, energy, torch.full_like(energy, math.inf))
        state.best_reward, state.best_log_prob = reward.clone(), log_prob.clone()
        state.best_tokens = tokens.clone()
        state.best_step = torch.zeros(state.chains, dtype=torch.long, device=engine.device)
    else:
        for c in range(state.chains):
            state.traces[c].append(stats[c])
        if any(improved for *_, improved in figures):
            state.steps_since_improved = 0
        else:
            state.steps_since_improved += 1
        state.lowest_energy = torch.where(improved, energy, state.lowest_energy)
        state.best_energy = torch.where(better, energy, state.best_energy)
        state.best_reward = torch.where(better, reward, state.best_reward)
        state.best_log_prob = torch.where(better, log_prob, state.best_log_prob)
        state.best_tokens = torch.where(better[:, None], tokens, state.best_tokens)
        state.best_step = torch.where(better, torch.full_like(state.best_step, state.step), state.best_step)
    if state.step >= config.steps or (config.patience and state.steps_since_improved >= config.patience):
        state.done = True
