"""Where one SEA step's time goes, with and without the prompt cache, and how many FLOPs a step does.

A step is one tick of the default (discrete) update for one request of ``chains`` chains: a forward and
backward pass of the reference LM and the principle reward at the chains' tokens (the straight-through
gradient), ``candidates`` proposals per chain, their exact scoring (each edit from its first edited
position on, after the chain's cached keys/values), and the acceptance bookkeeping. Every step here
recomputes the gradient (the worst case: every chain moved). The uncached step runs both prompts and
whole responses through the LM every time.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from app.engine.energy import RowSpec, evaluate
from app.engine.proposals import apply, edit_scores, propose, propose_chains
from app.engine.reuse import edit_starts, reuse_for_edits
from app.engine.sea import Engine
from app.engine.state import RequestState
from app.engine.types import AlignJob, SEAConfig
from models.lm import embedding_scale
from models.loading import LoadedLM
from models.rewards import PrincipleReward, Prompt, RewardMix
from models.ste import ResponseBatch
from models.tokens import render_prompt

# About 30 tokens once SmolLM2's chat template (with its default system turn) has wrapped it: the issue's reference configuration.
PROMPT = "How do I stop weeds?"


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call; ``repeats=0``: one call, no warm-up."""
    if repeats > 0:
        fn()
    runs = []
    for _ in range(max(repeats, 1)):
        tick = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - tick)
    return statistics.median(runs)


@dataclass
class StepSetup:
    """One request in flight on an engine, plus what the uncached variant of its passes needs."""

    engine: Engine
    state: RequestState
    prompts: list[list[int]]  # token ids of the reference prompt and the principle-prompted one
    candidates: int
    edit_starts: list[int] | None = None  # where each scored edit's pass starts (set by breakdown); None: whole responses

    @property
    def lm(self) -> LoadedLM:
        return self.engine.lm


def setup(lm: LoadedLM, chains: int, max_tokens: int, candidates: int = 4, seed: int = 0) -> StepSetup:
    """A discrete-update request of ``chains`` chains with its initial chains drawn and scored."""
    engine = Engine(lm)
    principle = PrincipleReward(lm)
    messages = [{"role": "user", "content": PROMPT}]
    prompt = Prompt(messages, render_prompt(lm.tokenizer, messages))
    # A huge step count and no early stop: the state can be ticked as often as the timing needs.
    config = SEAConfig(max_tokens=max_tokens, chains=chains, steps=10**9, candidates=candidates, seed=seed, max_estimate=float("inf"))
    state = engine.start(AlignJob(prompt, config, RewardMix([(principle, 1.0)])))
    principled = render_prompt(lm.tokenizer, messages, system=principle.principle)
    return StepSetup(engine, state, [prompt.ids, principled], candidates)


def _uncached_energy(setup: StepSetup, tokens: Tensor, with_grad: bool) -> Tensor:
    """The energy of ``tokens`` (B, L) with both prompts run through the LM every time (no key/value cache).

    With ``with_grad`` the gradient reaches the one-hot tokens, as in the engine's gradient pass.
    """
    model = setup.lm.model
    weight = model.get_input_embeddings().weight
    rows, length = tokens.shape
    mask = torch.ones(rows, length, device=tokens.device)
    probs = F.one_hot(tokens, weight.shape[0]).float().requires_grad_(True) if with_grad else None
    response = ResponseBatch(tokens=tokens, mask=mask, probs=probs)
    log_probs = []
    with torch.set_grad_enabled(with_grad):
        embeds = response.embed(weight, upto=length - 1)  # (B, L-1, d)
        for ids in setup.prompts:
            prompt = weight[torch.tensor(ids, device=tokens.device)].expand(rows, -1, -1)  # (B, P, d)
            logits = model(inputs_embeds=torch.cat([prompt, embeds], 1)).logits[:, len(ids) - 1 :].float()  # (B, L, V)
            log_probs.append((response.pick(F.log_softmax(logits, -1)) * mask).sum(1))
        log_prob_ref, log_prob_principle = log_probs
        alpha = setup.state.config.alpha
        energy = -(log_prob_ref + alpha * (log_prob_principle - log_prob_ref))  # (B,)
        if with_grad:
            torch.autograd.grad(energy.sum(), probs)
    return energy.detach()


def breakdown(setup: StepSetup, repeats: int = 3, uncached: bool = True) -> dict[str, float]:
    """Median seconds of a whole step and of each of its parts; ``bookkeeping`` is the step minus the timed parts."""
    engine, state = setup.engine, setup.state
    lm, stop = setup.lm, engine.stop_ids
    spec = state.spec
    reference_only = dataclasses.replace(spec, reward_terms=[])

    def step():
        state.stale = set(range(state.chains))  # every chain needs a gradient at its tokens (as after a step where all moved)
        state.tried = [set() for _ in range(state.chains)]
        state.stalls = [0] * state.chains  # and none is parked: every chain is edited, none restarts
        state.steps_since_improved = 0
        engine.tick([state])
        assert state.candidate_rows == state.chains * setup.candidates, "a timed step must score every chain's edits"

    def gradient(which: RowSpec):
        def run():
            with torch.enable_grad():
                evaluate(lm, [which], stop, state.tokens, one_hot_grad=True)
        return run

    with torch.enable_grad():
        scored = evaluate(lm, [spec], stop, state.tokens, one_hot_grad=True, record=True)
    grad = scored.grad  # (C, L, V)
    state.memories = scored.memories

    def proposal():
        counted = [int(n) for n in state.counted]
        propose_chains(edit_scores(grad, None, state.tokens), state.tokens, counted, setup.candidates, 0.05, state.generator,
                       [set() for _ in counted], float("inf"))

    def straight_through():
        # One-hot leaves and the embedding backward g @ Wᵀ (C, L, V) of the joint pass (each chain's rows under both
        # prompts, their gradients summed before the one matmul): the L×V matmul of the gradient.
        weight = lm.model.get_input_embeddings().weight
        probs = F.one_hot(state.tokens, weight.shape[0]).float().requires_grad_(True)
        response = ResponseBatch(tokens=state.tokens, mask=torch.ones(state.tokens.shape, device=state.tokens.device), probs=probs)
        joint = response.select(torch.arange(state.chains, device=state.tokens.device).repeat(len(setup.prompts)))
        with torch.enable_grad():
            embeds = joint.embed(weight, upto=state.tokens.shape[1] - 1, scale=embedding_scale(lm.model))  # (2C, L-1, d), as the engine
            torch.autograd.grad(embeds.sum(), probs)

    owners = []  # the edits a step scores: (state, chain, move)
    for c in range(state.chains):
        moves = propose(edit_scores(grad[c], None, state.tokens[c]), state.tokens[c], int(state.counted[c]), setup.candidates, 0.05,
                        torch.Generator(device=state.tokens.device).manual_seed(c), set(), float("inf"))
        owners.extend((state, c, move) for move in moves)
    held = state.tokens.tolist()
    candidates = torch.tensor([apply(held[c], move) for _, c, move in owners], device=state.tokens.device)  # (C·K, L)
    candidate_spec = dataclasses.replace(spec, rows=len(owners))
    setup.edit_starts = edit_starts([state], owners)
    reuse = reuse_for_edits([state], owners, setup.edit_starts, state.spec.length)

    def scoring():
        with torch.no_grad():
            evaluate(lm, [candidate_spec], stop, candidates, reuse=reuse)

    figures = {
        "step": timed(step, repeats),
        "reference_forward_backward": timed(gradient(reference_only), repeats),
        "gradient_forward_backward": timed(gradient(spec), repeats),
        "straight_through": timed(straight_through, repeats),
        "proposal": timed(proposal, repeats),
        "exact_scoring_forward": timed(scoring, repeats),
    }
    figures["reward_forward_backward"] = figures["gradient_forward_backward"] - figures["reference_forward_backward"]
    parts = figures["gradient_forward_backward"] + figures["proposal"] + figures["exact_scoring_forward"]
    figures["bookkeeping"] = figures["step"] - parts
    if uncached:
        figures["gradient_forward_backward_uncached"] = timed(lambda: _uncached_energy(setup, state.tokens, True), repeats)
        figures["exact_scoring_forward_uncached"] = timed(lambda: _uncached_energy(setup, candidates, False), repeats)
        figures["step_uncached"] = (figures["gradient_forward_backward_uncached"] + figures["exact_scoring_forward_uncached"]
                                    + figures["proposal"] + max(figures["bookkeeping"], 0.0))
    return figures


@dataclass
class ModelShape:
    """What the FLOP count of a decoder needs."""

    linear_params: int  # parameters of the matmuls a token goes through: every layer's projections and the LM head
    hidden: int
    vocab: int
    layers: int
    attention_width: int  # heads × head_dim of the queries

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        config = model.config
        embedding = model.get_input_embeddings().weight
        vocab, hidden = embedding.shape
        body = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name and "lm_head" not in name)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(body + vocab * hidden, hidden, vocab, config.num_hidden_layers, heads * head_dim)


def pass_flops(shape: ModelShape, rows: int, prompt: int, length: int, backward: bool, straight_through: bool = True) -> float:
    """FLOPs of one LM pass over ``length`` response tokens after a cached prompt of ``prompt`` tokens, for ``rows`` rows.

    Forward per token: ``2·linear_params`` (every matmul, LM head included) plus attention
    ``4·layers·attention_width·context`` (QKᵀ and A·V) with the mean context ``prompt + length/2``.
    Backward (weights frozen, so only input gradients): the matmuls once more (``dX = dY·Wᵀ``), attention twice
    (both factors of QKᵀ and A·V are activations), and, with ``straight_through``, the straight-through ``g @ Wᵀ``
    (``2·hidden·vocab``; passes over the same rows share one: their embedding gradients are summed first).
    """
    tokens = rows * length
    linear = 2 * shape.linear_params * tokens
    attention = 4 * shape.layers * shape.attention_width * (prompt + length / 2) * tokens
    if not backward:
        return linear + attention
    return linear + 2 * attention + 2 * shape.hidden * shape.vocab * tokens * straight_through


def step_flops(setup: StepSetup) -> float:
    """FLOPs of one step as timed by :func:`breakdown`: gradient pass (forward + backward) and exact scoring (forward).

    An edit scored from input position ``s`` on runs ``L − 1 − s`` positions after a context of the prompt and ``s``
    response tokens.
    """
    shape = ModelShape.of(setup.lm.model)
    state = setup.state
    length = state.spec.length - 1  # the first position's log-probs come with the prompt's cache
    starts = setup.edit_starts if setup.edit_starts is not None else [0] * (state.chains * setup.candidates)
    total = 0.0
    for k, prompt in enumerate(setup.prompts):  # reference and principle passes; one straight-through g @ Wᵀ for both
        total += pass_flops(shape, state.chains, len(prompt), length, backward=False)
        total += pass_flops(shape, state.chains, len(prompt), length, backward=True, straight_through=k == 0)
        for start in set(starts):
            total += pass_flops(shape, starts.count(start), len(prompt) + start, length - start, backward=False)
    return total


def matmul_peak(size: int = 2048, repeats: int = 5, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of a ``size``×``size`` by ``size``×``size`` matmul (``2·size³`` FLOPs): the best of ``repeats`` after a warm-up.

    The best, not the median: a peak is what the machine can do, and on a shared machine slower runs are other load.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device).to(dtype)
    b = torch.randn(size, size, generator=generator, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(max(repeats, 1)):
        tick = time.perf_counter()
        torch.mm(a, b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - tick)
    return 2 * size**3 / best
