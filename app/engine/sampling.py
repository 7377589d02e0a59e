"""Sampling from the reference policy after cached prompts, each request with its own random generator.

Requests started together draw their samples in one batch (:func:`drawing_groups`, which pauses after each token so
the worker can step other requests meanwhile; :func:`sample_groups` runs it to its end): a group's random draws
use only its own generator and happen at the same steps as when it samples alone, so a seeded request
gets the same samples alone or beside others.

A group can also draw from a *tilted* policy (:class:`Tilt`): each token from
``q(v) ∝ exp(ref_weight·log pi_ref(v) + Σ_k weight_k·log pi(v | guide prompt k))`` among the reference's
top-k tokens, each guide's log-prob limited as its reward limits it (:class:`Guide`). The guide prompts run as
extra rows of the same batch that read the drawn tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from app.engine.host import to_host
from models.kv import Prefix, cache_over, stack_prefixes
from models.lm import next_token_log_probs

ROW_TOKENS_PER_PASS = 8_192  # a draw or an exact scoring pass holds at most this many rows × (prompt + response) tokens


def rows_per_pass(width: int, prompt: int, response: int, budget: int | None = None) -> int:
    """How many rows of ``width`` batch rows of ``prompt`` + ``response`` tokens one pass holds (at least one)."""
    return max(1, (budget or ROW_TOKENS_PER_PASS) // (width * (prompt + response)))


def row_chunks(sizes: list[tuple[int, int, int, int]], budget: int | None = None) -> list[list[tuple[int, int, int]]]:
    """Passes for groups of ``(rows, batch rows per row, prompt tokens, response tokens)`` laid out group after group
    (a row runs once per prompt it is read under; a pass pads every batch row to its longest prompt and its longest
    response), each holding at most ``budget`` tokens (a row longer than that alone): a list of ``(group, first row,
    end row)`` per pass.

    A group too large for one pass is cut into pieces that depend on it alone, and no two pieces of a group share a
    pass, so what a group draws or scores does not depend on the groups beside it. Pieces are packed in order.
    """
    budget = budget or ROW_TOKENS_PER_PASS
    chunks: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    batch_rows = prompt_max = response_max = 0
    for group, (rows, width, prompt, response) in enumerate(sizes):
        per_piece = rows_per_pass(width, prompt, response, budget)
        for first in range(0, rows, per_piece):
            end = min(first + per_piece, rows)
            held = (batch_rows + (end - first) * width) * (max(prompt_max, prompt) + max(response_max, response))
            if current and held > budget:
                chunks.append(current)
                current, batch_rows, prompt_max, response_max = [], 0, 0, 0
            current.append((group, first, end))
            batch_rows += (end - first) * width
            prompt_max, response_max = max(prompt_max, prompt), max(response_max, response)
    if current:
        chunks.append(current)
    return chunks


@dataclass
class Samples:
    tokens: Tensor  # (N, L) long; positions after the first stop token hold a stop token
    log_probs: Tensor | None  # (N, L, V) float32 log pi_ref at each position (only when asked for)
    forward_token_passes: int
    # (N, 1 + guides + scoring prompts, L) float32: each drawn token's log-prob under the reference, then under each
    # guide prompt and each ``scored_by`` prompt (computed by the draw anyway); 0 after a row's first stop token. Only
    # the drawn tokens, not ``given`` ones.
    token_log_probs: Tensor | None = None


@dataclass(frozen=True)
class Guide:
    """One prompt of a tilt, and the limits its reward puts on what a token earns from it."""

    prefix: Prefix  # the guide prompt
    weight: float  # of its log-probs
    # (log-probs here (n, V), the reference's (n, V), the tokens so far (n, t)) -> the log-probs as the reward limits them
    limit: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    source: object = None  # what these log-probs belong to, for the caller (the sampler never reads it)


@dataclass(frozen=True)
class Tilt:
    """Per-token tilt of the reference policy by the log-probs of the same network under other prompts."""

    guides: tuple[Guide, ...]
    ref_weight: float  # weight of the reference's own log-probs
    top_k: int  # draw only among the reference's top-k tokens (keeps the text plausible where the tilt extrapolates)


@dataclass
class SampleGroup:
    """One request's share of a sampling batch."""

    prefix: Prefix
    n: int
    max_tokens: int
    generator: torch.Generator
    temperature: float = 1.0  # 0: greedy decoding
    top_p: float = 1.0
    tilt: Tilt | None = None  # None: plain samples of the reference
    # Prompts the drawn tokens are also run under, untilted, for their log-probs (``Samples.token_log_probs`` after
    # the guides'): what beam search scores its successors with.
    scored_by: tuple[Prefix, ...] = ()
    greedy_rows: int = 0  # the first rows take the most likely token instead (their random draws are still made)
    abandoned: Callable[[], bool] | None = None  # once true, the group stops drawing (its rows are left unfinished)

    @property
    def prompts(self) -> list[Prefix]:
        """Every prompt a drawn row runs under, one batch row each: its own, each guide's, each scoring prompt."""
        return [self.prefix, *(guide.prefix for guide in (self.tilt.guides if self.tilt else ())), *self.scored_by]


def _filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _tilted(ref: Tensor, guides: list[Tensor], tilt: Tilt, history: Tensor) -> Tensor:
    """Unnormalised log-probs of the tilted policy ``(n, V)`` after the tokens ``history`` ``(n, t)``: ``-inf``
    outside the reference's top-k."""
    mixed = tilt.ref_weight * ref
    for log_probs, guide in zip(guides, tilt.guides):
        if guide.limit is not None:
            log_probs = guide.limit(log_probs, ref, history)
        mixed = mixed + guide.weight * log_probs
    top = ref.topk(min(tilt.top_k, ref.shape[-1]), dim=-1).indices
    return torch.full_like(mixed, float("-inf")).scatter(-1, top, mixed.gather(-1, top))


def categorical(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One index per row of ``probs`` ``(n, V)`` (non-negative, not necessarily normalised), by inverse CDF: one
    uniform per row, a cumulative sum and a binary search. A zero-probability index is never drawn.

    ``torch.multinomial`` takes about 30 ms for 9 rows of a 49 152-token vocabulary on a CPU core (every drawn
    token of every sample pays it); this takes about 1.5 ms.
    """
    cumulative = probs.float().cumsum(-1)
    total = cumulative[:, -1:]
    uniform = torch.rand(total.shape, generator=generator, device=probs.device)
    # Strictly below the total, so that the first index whose cumulative sum exceeds it has probability > 0.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cumulative, target, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)
    # A parallel cumulative sum (CUDA's) may step up by a rounding error over zero-probability entries, where the
    # search can land: such a draw (about one in ten million) takes the likeliest index instead.
    return torch.where(probs.gather(-1, drawn[:, None])[:, 0] > 0, drawn, probs.argmax(-1))


def _draw(log_probs: Tensor, group: SampleGroup) -> Tensor:
    if group.temperature <= 0:
        return log_probs.argmax(-1)
    probs = torch.softmax(_filter_top_p(log_probs / group.temperature, group.top_p), dim=-1)
    drawn = categorical(probs, group.generator)
    if group.greedy_rows:
        drawn[: group.greedy_rows] = log_probs[: group.greedy_rows].argmax(-1)
    return drawn


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    prefix: Prefix,
    n: int,
    max_tokens: int,
    stop_ids: Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
    keep_log_probs: bool = False,
    given: Tensor | None = None,
    tilt: Tilt | None = None,
    given_repeats: int = 1,
) -> Samples:
    """Draw ``n`` responses of at most ``max_tokens`` tokens; ``temperature = 0`` is greedy decoding.

    With ``given`` (n / given_repeats, g) the responses continue those tokens, each given row shared by
    ``given_repeats`` consecutive responses (its keys/values are computed once, then shared): ``max_tokens`` new
    tokens are drawn and returned after them.
    """
    group = SampleGroup(prefix, n, max_tokens, generator, temperature, top_p, tilt)
    return sample_groups(model, [group], stop_ids, keep_log_probs, given, given_repeats)[0]


def run_for(run: Generator, seconds: float = math.inf) -> tuple[bool, object]:
    """Resume ``run`` (a draw, a baseline's run, a start: pieces of work between pauses) for about ``seconds`` (at least
    one piece), or to its end: whether it ended, and what it returned."""
    until = time.perf_counter() + seconds
    try:
        while True:
            next(run)
            if time.perf_counter() >= until:
                return False, None
    except StopIteration as end:
        return True, end.value


def sample_groups(*args, **kwargs) -> list[Samples]:
    """:func:`drawing_groups` (same arguments) run to its end."""
    return run_for(drawing_groups(*args, **kwargs))[1]


@dataclass
class _Layout:
    """Where each group's rows sit in a drawing batch: every group's own (drawn) rows first, then one copy of a group's
    rows per guide prompt, then per prompt it is scored by."""

    slices: list[slice]  # per group, its drawn rows
    guide_rows: list[list[slice]]  # per group, per guide and then per scoring prompt: its rows in the batch
    prefixes: list[Prefix]  # per batch row, its prompt
    owners: list[int]  # per batch row, the drawn row whose tokens it reads

    @property
    def rows(self) -> int:
        return self.slices[-1].stop

    @property
    def group_rows(self) -> list[list[slice]]:
        """Per group, its batch rows: its own, then its guides' and scoring prompts'."""
        return [[rows_of, *guides] for rows_of, guides in zip(self.slices, self.guide_rows)]


def _layout(groups: list[SampleGroup]) -> _Layout:
    bounds = torch.tensor([0, *[g.n for g in groups]]).cumsum(0).tolist()
    slices = [slice(bounds[i], bounds[i + 1]) for i in range(len(groups))]
    prefixes = [g.prefix for g in groups for _ in range(g.n)]
    owners = list(range(bounds[-1]))
    guide_rows: list[list[slice]] = []
    for group, rows_of in zip(groups, slices):
        mine = []
        for prefix in group.prompts[1:]:
            mine.append(slice(len(prefixes), len(prefixes) + group.n))
            prefixes.extend([prefix] * group.n)
            owners.extend(range(rows_of.start, rows_of.stop))
        guide_rows.append(mine)
    return _Layout(slices, guide_rows, prefixes, owners)


def _feed_given(model: PreTrainedModel, batch, given: Tensor, given_repeats: int, owner: Tensor):
    """Run the ``given`` tokens (drawn rows, g) after each batch row's prompt, once per share of ``given_repeats`` rows:
    the cache, the attention mask and the next token's log-probs (batch rows, V) after them."""
    device = batch.mask.device
    start = given.shape[1]
    mask = torch.cat([batch.mask, torch.ones(len(owner), start, dtype=batch.mask.dtype, device=device)], dim=1)
    positions = batch.lengths[:, None] + torch.arange(start, device=device)[None, :]
    if given_repeats == 1:
        cache = cache_over(batch.keys, batch.values)
        return cache, mask, next_token_log_probs(model, given[owner], mask, positions, cache)
    # The first batch row of each share (its prompt rows' shares follow the drawn rows' order, in blocks of whole shares).
    first = torch.arange(0, len(owner), given_repeats, device=device)
    shared = cache_over([k[first] for k in batch.keys], [v[first] for v in batch.values])
    log_probs = next_token_log_probs(model, given[owner[first]], mask[first], positions[first], shared)
    cache = cache_over([layer.keys.repeat_interleave(given_repeats, 0) for layer in shared.layers],
                       [layer.values.repeat_interleave(given_repeats, 0) for layer in shared.layers])
    return cache, mask, log_probs.repeat_interleave(given_repeats, 0)


@torch.no_grad()  # entered at each resumption of the generator and left at each pause
def drawing_groups(
    model: PreTrainedModel,
    groups: list[SampleGroup],
    stop_ids: Tensor,
    keep_log_probs: bool = False,
    given: Tensor | None = None,
    given_repeats: int = 1,
) -> Generator[None, None, list[Samples]]:
    """Draw every group's responses in one batch of decoding steps; one :class:`Samples` per group. A generator that
    pauses after each drawn token (a baseline's run lets other requests step there) and returns the samples.

    A group stops drawing (and counting passes) once all its rows have stopped or reached its
    ``max_tokens``, exactly when it would stop alone. ``given`` (rows / given_repeats, g) starts the rows, each
    given row those of ``given_repeats`` consecutive rows (run once, then shared: beam search's successors).
    """
    layout = _layout(groups)
    rows, slices, guide_rows = layout.rows, layout.slices, layout.guide_rows
    batch = stack_prefixes(layout.prefixes)
    device = batch.mask.device
    owner = torch.tensor(layout.owners, device=device)
    batch_rows = len(layout.owners)
    width = [1 + len(parts) for parts in guide_rows]  # batch rows per drawn row
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    if given is not None and given_repeats > 1 and (given.shape[0] * given_repeats != rows or any(g.n % given_repeats for g in groups)):
        raise ValueError("shared given rows need one row per given_repeats drawn rows, and groups of whole shares")
    if given is not None:
        given = given.repeat_interleave(given_repeats, 0)  # (rows, g)
    start = 0 if given is None else given.shape[1]
    if start:
        cache, mask, log_probs = _feed_given(model, batch, given, given_repeats, owner)
        finished |= torch.isin(given, stop_ids).any(1)
    else:
        cache, mask, log_probs = cache_over(batch.keys, batch.values), batch.mask, batch.first_log_probs  # (batch rows, V)
    passes = [g.n * start * w // given_repeats for g, w in zip(groups, width)]
    longest = max(g.max_tokens for g in groups)
    tokens = torch.full((rows, longest), int(stop_ids[0]), dtype=torch.long, device=device)
    tables = [] if keep_log_probs else None
    picked = torch.zeros(batch_rows, longest, device=device)  # each batch row's log-prob of its drawn row's token
    group_rows = layout.group_rows
    group_index = [torch.cat([torch.arange(r.start, r.stop, device=device) for r in parts]) for parts in group_rows]
    drawing = [g.max_tokens > 0 for g in groups]
    for t in range(longest):
        if t > 0:
            mask = torch.cat([mask, torch.ones(batch_rows, 1, dtype=mask.dtype, device=device)], dim=1)
            fresh = next_token_log_probs(model, tokens[owner, t - 1 : t], mask, batch.lengths[:, None] + (start + t - 1), cache)
            if tables is None:
                log_probs = fresh
            else:  # a group that stopped repeats its last table row, as it does alone
                active = torch.zeros(batch_rows, dtype=torch.bool, device=device)
                for i, rows_of in enumerate(slices):
                    active[rows_of] = drawing[i]
                active = active[owner]
                log_probs = torch.where(active[:, None], fresh, log_probs)
            for i, group in enumerate(groups):
                passes[i] += group.n * width[i] * drawing[i]
        if tables is not None:
            tables.append(log_probs[:rows])
        stopped = {}  # per group that may draw on: whether all its rows have stopped, read at once for all groups
        for i, group in enumerate(groups):
            if not drawing[i]:
                continue
            rows_of = slices[i]
            own = log_probs[rows_of]
            if group.tilt is not None:
                history = tokens[rows_of, :t] if given is None else torch.cat([given[rows_of], tokens[rows_of, :t]], dim=1)
                own = _tilted(own, [log_probs[r] for r in guide_rows[i][: len(group.tilt.guides)]], group.tilt, history)
            was_finished = finished[rows_of].clone()
            drawn = torch.where(was_finished, tokens[rows_of, t], _draw(own, group))
            tokens[rows_of, t] = drawn
            finished[rows_of] |= torch.isin(drawn, stop_ids)
            if t + 1 < group.max_tokens:
                stopped[i] = finished[rows_of].all()
            else:
                drawing[i] = False
            index = group_index[i]
            picked[index, t] = torch.where(was_finished.repeat(width[i]), 0.0, log_probs[index].gather(-1, tokens[owner[index], t, None])[:, 0])
        if stopped:
            for i, all_stopped in zip(stopped, to_host(torch.stack(list(stopped.values())))[0]):
                abandoned = groups[i].abandoned
                drawing[i] = not all_stopped and not (abandoned is not None and abandoned())
        if not any(drawing):
            if tables is not None:  # positions after every row stopped: uniform stop tokens, table unused
                tables.extend([log_probs[:rows]] * (longest - t - 1))
            break
        yield
    table = torch.stack(tables, dim=1) if tables is not None else None
    if given is not None and given.shape[1] > 0:
        tokens = torch.cat([given, tokens], dim=1)
    results = []
    for i, group in enumerate(groups):
        keep = slice(0, start + group.max_tokens)
        results.append(Samples(
            tokens[slices[i], keep],
            None if table is None else table[slices[i], : group.max_tokens],
            passes[i],
            torch.stack([picked[r, : group.max_tokens] for r in group_rows[i]], dim=1),
        ))
    return results


def drawing_groups_in_chunks(model: PreTrainedModel, groups: list[SampleGroup], stop_ids: Tensor) -> Generator[None, None, list[Samples]]:
    """:func:`drawing_groups` in batches of at most :data:`ROW_TOKENS_PER_PASS` tokens (:func:`row_chunks`; a drawn row
    holds its prompt, its guide and scoring prompts, and the response), so that a request asking for many samples does
    not hold them all at once. A group small enough for one batch draws exactly what it draws in one; a larger one
    draws its pieces one after the other from its generator, the same whatever groups are beside it. A generator that
    pauses after each drawn token, as :func:`drawing_groups` does."""
    pieces: list[list[Samples]] = [[] for _ in groups]
    sizes = [(group.n, len(group.prompts), max(p.length for p in group.prompts), group.max_tokens) for group in groups]
    for chunk in row_chunks(sizes):
        parts = [dataclasses.replace(groups[g], n=end - first, greedy_rows=min(groups[g].greedy_rows, end) if first == 0 else 0)
                 for g, first, end in chunk]
        for (g, _, _), samples in zip(chunk, (yield from drawing_groups(model, parts, stop_ids))):
            pieces[g].append(samples)
    return [joined_samples(parts) for parts in pieces]


def joined_samples(parts: list[Samples]) -> Samples:
    """The samples of several draws of one group, in order (without log-prob tables)."""
    if len(parts) == 1:
        return parts[0]
    return Samples(torch.cat([p.tokens for p in parts]), None, sum(p.forward_token_passes for p in parts),
                   torch.cat([p.token_log_probs for p in parts]))
