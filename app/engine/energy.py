"""Exact energies ``E = −[log pi_ref(y|x) + alpha·r(x,y)]`` of a batch of rows, and their logit gradients.

Rows may come from different requests (different prompts, lengths, rewards and alphas). Each reward
component runs once over all the rows that use it.

A pass can record the memories of its rows (``record``), and edits of those rows are then scored from
their first edited position on (``reuse``): the unchanged head of each row is read, not recomputed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from app.engine.sampling import Guide, Tilt, row_chunks
from models.kv import MemoryRecorder, Prefix, ResponseMemory, Reuse, stack_prefixes
from models.lm import response_token_log_probs
from models.loading import LoadedLM
from models.rewards import RewardComponent
from models.ste import ResponseBatch, masked_sum, response_mask

REFERENCE = "reference"  # the memory key of the reference LM's own pass

@dataclass
class RowSpec:
    """What the energy of a group of rows (one request's chains) needs to know."""

    prefix: Prefix  # the reference prompt's cached keys/values
    reward_terms: list[tuple[RewardComponent, float, object]]  # (component, weight, its prepared context)
    alpha: float
    use_reward: bool
    use_reference: bool
    length: int  # response length L of these rows
    rows: int


def row_size(spec: RowSpec, width: int | None = None) -> tuple[int, int, int]:
    """(batch rows, prompt tokens, response tokens) of one row of ``spec`` in a scoring pass: it runs under its prompt
    and again under each reward's own prompt (the principle's rows run beside the reference's), padded to the longest;
    its response is ``width`` tokens wide (a batch pads every row to its longest request), else its own length."""
    prompts = [spec.prefix, *(context for _, _, context in spec.reward_terms if isinstance(context, Prefix))]
    return len(prompts), max(prompt.length for prompt in prompts), width or spec.length


@dataclass
class Evaluation:
    tokens: Tensor  # (B, L_max) hard tokens that were scored
    mask: Tensor  # (B, L_max) positions that count
    energy: Tensor  # (B,) detached, float32
    reward: Tensor  # (B,)
    log_prob_ref: Tensor  # (B,)
    grad: Tensor | None  # (B, L_max, V) dE/dy (or dE/d one-hot), None when not asked for
    table: Tensor | None  # (B, L_max, V) log pi_ref at each position, detached, when asked for
    ref_top_k: Tensor | None  # (B, L_max, k) the reference LM's top-k tokens per position, when asked for
    memories: dict[object, ResponseMemory] | None = None  # per LM scorer, what the pass leaves for scoring edits


def runs_in_reference_pass(component, model) -> bool:
    """Whether a reward component is ``model``'s own log-probs under a prompt of its own (the principle): it then runs
    in the reference's pass (one row per prompt) and scores its tokens from their log-probs (``from_log_probs``)."""
    return component.from_log_probs is not None and component.model is model


def evaluate(
    lm: LoadedLM,
    specs: list[RowSpec],
    stop_ids: Tensor,
    tokens: Tensor,
    logits: Tensor | None = None,
    allowed: Tensor | None = None,
    top_k: int | None = None,
    one_hot_grad: bool = False,
    keep_table: bool = False,
    record: bool = False,
    reuse: Reuse | None = None,
    known: dict[object, Tensor] | None = None,
) -> Evaluation:
    """Score ``tokens`` (B, L_max); with ``logits`` (B, L_max, V) also return ``dE/dlogits`` via the STE.

    ``one_hot_grad`` instead returns ``dE/d one_hot(tokens)`` (B, L_max, V): entry ``[b, t, v]`` is the
    first-order change of the energy when position t becomes token v (the discrete proposals' input).
    ``allowed`` (B, L_max, V) bool restricts the softmax to a candidate set (top-k decoding).
    Rows are laid out group after group, in the order of ``specs``.
    ``record`` returns each LM scorer's :class:`ResponseMemory` of the rows; ``reuse`` scores rows that are
    edits of rows recorded earlier from their starts on (exact scoring only).
    ``known`` holds per-token log-probs ``(B, L_max)`` of every row that were computed already (a sampler's, see
    :attr:`app.engine.sampling.Samples.token_log_probs`), keyed by ``REFERENCE`` or by the reward component whose
    log-probs they are (one that scores ``from_log_probs``): those scorers do not run again (exact scoring only).
    """
    known = known or {}
    if known and (logits is not None or one_hot_grad or keep_table or top_k or record or reuse is not None):
        raise ValueError("known log-probs serve exact scoring only: no gradient, table, memory or reuse")
    device = tokens.device
    lengths = torch.cat([torch.full((s.rows,), s.length, device=device) for s in specs])
    mask = response_mask(tokens, stop_ids, lengths)  # (B, L_max)
    probs, leaf = _relaxed(lm, tokens, logits, allowed, one_hot_grad)
    recorder = MemoryRecorder(tokens.shape[0]) if record else None
    response = ResponseBatch(tokens=tokens, mask=mask, probs=probs, reuse=reuse, recorder=recorder)
    entries = _component_entries(specs, device)
    # Rewards that are log-probs of the reference network under their own prompt run in the reference's pass.
    joint = [entry for entry in entries if runs_in_reference_pass(entry[0], lm.model) and entry[0] not in known]

    with torch.set_grad_enabled(probs is not None):
        joint_log_probs, table = _reference_pass(lm, specs, response, joint, known, bool(top_k or keep_table))
        ref_top_k = table.detach().topk(min(top_k, table.shape[-1]), dim=-1).indices if top_k else None
        table = table.detach() if keep_table else None  # else freed before the backward pass (B × L × V floats)
        log_prob_ref = masked_sum(response.token_log_prob_ref, mask)
        precomputed, offset = {}, 0
        for component, index, _ in joint:
            precomputed[id(component)] = component.from_log_probs(joint_log_probs[offset : offset + len(index)], response.select(index))
            offset += len(index)
        for component, index, _ in (entry for entry in entries if entry[0] in known):
            precomputed[id(component)] = component.from_log_probs(known[component][index], response.select(index))
        reward = score_rewards(specs, response, precomputed)
        alpha = torch.cat([torch.full((s.rows,), s.alpha * s.use_reward, device=device) for s in specs])
        ref_on = torch.cat([torch.full((s.rows,), float(s.use_reference), device=device) for s in specs])
        energy = -(ref_on * log_prob_ref + alpha * reward)  # (B,)

    return Evaluation(
        tokens=tokens,
        mask=mask,
        energy=energy.detach(),
        reward=reward.detach(),
        log_prob_ref=log_prob_ref.detach(),
        grad=None if leaf is None else _gradient(energy, leaf),
        table=table,
        ref_top_k=ref_top_k,
        memories=None if recorder is None else recorder.memories,
    )


def _relaxed(lm: LoadedLM, tokens: Tensor, logits: Tensor | None, allowed: Tensor | None, one_hot_grad: bool) -> tuple[Tensor | None, Tensor | None]:
    """The soft one-hots (B, L_max, V) a scoring pass differentiates through, and the leaf its gradient is taken
    of: the softmax of ``logits`` (over the ``allowed`` tokens), or the one-hots of ``tokens``; none for exact scores."""
    if logits is not None:
        leaf = logits.detach().requires_grad_(True)
        masked = leaf if allowed is None else leaf.masked_fill(~allowed, float("-inf"))
        return torch.softmax(masked, dim=-1), leaf
    if one_hot_grad:
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        one_hot = torch.nn.functional.one_hot(tokens, vocab).float().requires_grad_(True)
        return one_hot, one_hot
    return None, None


def _reference_pass(lm: LoadedLM, specs: list[RowSpec], response: ResponseBatch, joint: list, known: dict[object, Tensor],
                    with_table: bool) -> tuple[Tensor | None, Tensor | None]:
    """One pass of the reference LM: each row under its request's prompt (unless ``known`` holds those log-probs)
    and, beside it, under the prompt of each reward in ``joint`` that uses the row. Sets
    ``response.token_log_prob_ref``; returns the joint rewards' per-token log-probs (their rows in ``joint``'s
    order) and, ``with_table``, the reference's log-prob table (B, L_max, V)."""
    rows = response.tokens.shape[0]
    reward_prompts = [context for _, _, contexts in joint for context in contexts]
    if REFERENCE in known:
        response.token_log_prob_ref = known[REFERENCE]
        if not joint:
            return None, None
        together = _joined(response, joint, with_response=False)
        return response_token_log_probs(lm.model, stack_prefixes(reward_prompts), together, key=REFERENCE), None
    prefixes = stack_prefixes([s.prefix for s in specs for _ in range(s.rows)] + reward_prompts)
    together = _joined(response, joint)
    table = None
    if with_table:
        token_log_probs, table = response_token_log_probs(lm.model, prefixes, together, return_table=True, key=REFERENCE)
        table = table[:rows]
    else:
        token_log_probs = response_token_log_probs(lm.model, prefixes, together, key=REFERENCE)
    if joint and response.recorder is not None and REFERENCE in together.recorder.memories:
        _split_memory(together.recorder.memories[REFERENCE], response.recorder, rows, joint)
    response.token_log_prob_ref = token_log_probs[:rows]
    return token_log_probs[rows:], table


def _gradient(energy: Tensor, leaf: Tensor) -> Tensor:
    """Every row's dE/d``leaf``: rows are independent, so one backward of the sum gives each its own; a row whose
    energy is not finite contributes nothing."""
    finite = torch.isfinite(energy)
    objective = torch.where(finite, energy, torch.zeros_like(energy)).sum()
    if not objective.requires_grad:
        return torch.zeros_like(leaf)
    (grad,) = torch.autograd.grad(objective, leaf)
    return grad


class Abandoned(Exception):
    """Nobody waits for the work under way any more (every request it serves was cancelled or ran past its deadline)."""


def evaluate_in_chunks(
    lm: LoadedLM,
    specs: list[RowSpec],
    stop_ids: Tensor,
    tokens: Tensor,
    known: dict[object, Tensor] | None = None,
    reuse_of: Callable[[list[int]], Reuse | None] | None = None,
    abandoned: Callable[[], bool] | None = None,
) -> Evaluation:
    """Exact scores of ``tokens``, as :func:`evaluate` gives them, in passes of at most :data:`ROW_TOKENS_PER_PASS`
    tokens (:func:`row_chunks`), so that memory stays bounded however many rows a request asks for (candidates,
    samples). ``reuse_of(rows)`` gives the :class:`Reuse` of a pass's rows (a list of their indices), if any. Raises
    :class:`Abandoned` between passes once ``abandoned()`` says nobody waits for any of the scores."""
    chunks = row_chunks([(spec.rows, *row_size(spec, tokens.shape[1])) for spec in specs])
    starts = [0]
    for spec in specs:
        starts.append(starts[-1] + spec.rows)
    parts = []
    whole = len(chunks) == 1
    for chunk in chunks:
        if parts and abandoned is not None and abandoned():
            raise Abandoned
        rows = [row for group, first, end in chunk for row in range(starts[group] + first, starts[group] + end)]
        index = None if whole else torch.tensor(rows, device=tokens.device)
        parts.append(evaluate(
            lm, specs if whole else [dataclasses.replace(specs[group], rows=end - first) for group, first, end in chunk],
            stop_ids, tokens if whole else tokens[index],
            known=None if known is None else {key: value if whole or value is None else value[index] for key, value in known.items()},
            reuse=reuse_of(rows) if reuse_of is not None else None,
        ))
    if len(parts) == 1:
        return parts[0]
    return Evaluation(tokens=torch.cat([p.tokens for p in parts]), mask=torch.cat([p.mask for p in parts]),
                      energy=torch.cat([p.energy for p in parts]), reward=torch.cat([p.reward for p in parts]),
                      log_prob_ref=torch.cat([p.log_prob_ref for p in parts]), grad=None, table=None, ref_top_k=None)


def _component_rows(specs: list[RowSpec]) -> dict[int, tuple[RewardComponent, list[int], list[float], list[object]]]:
    """Per reward component: the rows that use it, with their weights and prepared contexts."""
    groups: dict[int, tuple[RewardComponent, list[int], list[float], list[object]]] = {}
    start = 0
    for spec in specs:
        for component, weight, context in spec.reward_terms:
            entry = groups.setdefault(id(component), (component, [], [], []))
            entry[1].extend(range(start, start + spec.rows))
            entry[2].extend([weight] * spec.rows)
            entry[3].extend([context] * spec.rows)
        start += spec.rows
    return groups


def _component_entries(specs: list[RowSpec], device) -> list[tuple[RewardComponent, Tensor, list[object]]]:
    """Per reward component: (the component, the rows that use it, their prepared contexts)."""
    return [(component, torch.tensor(rows, device=device), contexts) for component, rows, _, contexts in _component_rows(specs).values()]


def _joined(response: ResponseBatch, joint: list[tuple[RewardComponent, Tensor, list]], with_response: bool = True) -> ResponseBatch:
    """``response`` followed by a copy of each joined reward's rows: one pass of the reference network scores the
    reference and the rewards that read it. Memories to reuse are laid out the same way. Without
    ``with_response`` only the copies (the reference's own log-probs are known)."""
    if not joint and with_response:
        return response
    own = [torch.arange(response.rows, device=response.tokens.device)] if with_response else []
    index = torch.cat([*own, *(rows for _, rows, _ in joint)])
    reuse = response.reuse
    if reuse is not None:
        parts = [reuse.memories.get(key) for key in [REFERENCE, *(component for component, _, _ in joint)]]
        if any(part is None for part in parts):
            reuse = None  # nothing recorded to resume from: a full pass
        else:
            picked = [parts[0]] + [part.rows(rows) for part, (_, rows, _) in zip(parts[1:], joint)]
            reuse = Reuse(reuse.starts[index], {REFERENCE: ResponseMemory.cat(picked)})
    return ResponseBatch(tokens=response.tokens[index], mask=response.mask[index],
                         probs=response.probs, probs_rows=None if response.probs is None else response.source_rows(index), reuse=reuse,
                         recorder=None if response.recorder is None else MemoryRecorder(len(index)))


def _split_memory(memory: ResponseMemory, recorder: MemoryRecorder, rows: int, joint: list) -> None:
    """Hand the joined pass's memory back as the reference's (first ``rows`` rows) and each joined reward's."""
    recorder.put(REFERENCE, None, memory.rows(slice(0, rows)))
    offset = rows
    for component, index, _ in joint:
        recorder.put(component, index, memory.rows(slice(offset, offset + len(index))))
        offset += len(index)


def score_rewards(specs: list[RowSpec], response: ResponseBatch, precomputed: dict[int, Tensor] | None = None) -> Tensor:
    """The weighted reward of every row ``(B,)``; each component runs once over all the rows that use it.

    ``response.token_log_prob_ref`` must be set (the principle reward subtracts it). ``precomputed`` holds, by
    component id, scores already computed for the component's rows (in spec order).
    """
    device = response.tokens.device
    reward = torch.zeros(response.rows, device=device)
    for key, (component, rows, weights, contexts) in _component_rows(specs).items():
        index = torch.tensor(rows, device=device)
        if precomputed and key in precomputed:
            scores = precomputed[key]
        else:
            scores = component.score(contexts, response.select(index))
        reward = reward.index_add(0, index, scores.float() * torch.tensor(weights, device=device))
    return reward


def reward_passes(components, length: int, start: int = 0) -> int:
    """LM token-passes (one direction) that reward ``components`` run to score one response of ``length`` tokens.

    A component that scores next-token log-probs (``next_token``) feeds, as the reference does, only the first L − 1
    tokens: the first one's log-prob comes from its prompt's pass. Another (a classifier) reads all L. A component
    that resumes from a memory runs an edit only from input position ``start`` on (see :class:`models.kv.Reuse`).
    """
    return sum(
        component.lm_passes * ((length - 1 if component.next_token else length) - (start if component.resumes else 0))
        for component in components)


def scoring_passes(length: int, components, start: int = 0) -> int:
    """LM token-passes (one direction) of scoring one response of ``length`` tokens (from input position ``start``
    on): the reference's and the LM-based rewards'."""
    return (length - 1 - start) + reward_passes(components, length, start)


def draw_cost(length: int, guides: int, left_to_score: int) -> int:
    """LM token-passes of drawing one sample of ``length`` tokens and scoring it exactly: the draw feeds back every
    token but the last (the first comes from the prompt's pass), under each of its ``guides`` prompts too, and gives
    those tokens' reference and guide log-probs, so scoring it costs only ``left_to_score``, the passes of the rest."""
    return (length - 1) * (1 + guides) + left_to_score


def passes_per_row(spec: RowSpec, start: int = 0, known: frozenset = frozenset()) -> int:
    """LM token-passes (one direction) that scoring one row of ``spec`` costs (from input position ``start`` on),
    leaving out the scorers in ``known`` (``REFERENCE`` or reward components: their log-probs were given)."""
    passes = scoring_passes(spec.length, [component for component, _, _ in spec.reward_terms if component not in known], start)
    return passes - (spec.length - 1 - start) if REFERENCE in known else passes


def drawn_scorers(tilt: Tilt | None) -> frozenset:
    """The scorers whose per-token log-probs a draw (plain, or tilted by ``tilt``) computes: the reference's, and
    each guide's reward component's. Keys of ``evaluate``'s ``known``."""
    return frozenset(drawn_log_probs(None, tilt))


def drawn_log_probs(token_log_probs: Tensor | None, tilt: Tilt | None) -> dict[object, Tensor | None]:
    """``Samples.token_log_probs`` ``(n, 1 + guides, L)`` as ``evaluate``'s ``known`` log-probs, by scorer (only the
    components that score ``from_log_probs``; ``None`` values with ``token_log_probs=None``)."""
    known = {REFERENCE: None if token_log_probs is None else token_log_probs[:, 0]}
    for k, guide in enumerate(tilt.guides if tilt else ()):
        if getattr(guide.source, "from_log_probs", None):
            known[guide.source] = None if token_log_probs is None else token_log_probs[:, 1 + k]
    return known


def token_tilt(spec: RowSpec, model, top_k: int) -> Tilt | None:
    """The per-token part of ``spec``'s energy that a sampler can draw by (None when the rewards have none).

    A contrastive reward ``log pi(y | c) − log pi_ref(y | x)`` of the reference network is a sum over tokens, so
    ``−E = (use_reference − a)·log pi_ref + a·log pi(y | c) + (the other rewards)`` with ``a = alpha·weight``:
    drawing each token from ``pi_ref^(use_reference − a) · pi(· | c)^a`` (among the reference's top-k) follows
    the energy token by token, blind only to how a token changes the later terms and to the other rewards.
    """
    if not spec.use_reward:
        return None
    guides = tuple(Guide(context, spec.alpha * weight, component.limit_candidates, component)
                   for component, weight, context in spec.reward_terms
                   if component.contrastive and component.model is model)
    if not guides:
        return None
    return Tilt(guides, float(spec.use_reference) - sum(guide.weight for guide in guides), top_k)
