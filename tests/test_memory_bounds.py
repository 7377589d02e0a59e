"""What one request may hold in memory: draws and exact scoring run in passes of bounded size, and baselines stop
drawing once their job is abandoned (a client's timeout or cancel), as SEA's chains do."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from app.engine import sampling
from app.engine.energy import RowSpec, evaluate, evaluate_in_chunks, row_size
from app.engine.sampling import row_chunks
from app.engine.types import AlignJob, SEAConfig
from models.lm import encode_prefix
from models.rewards import LexiconReward, PrincipleReward, RewardMix
from tests.tiny import positions_run


@pytest.fixture
def reward(lm):
    return RewardMix([(PrincipleReward(lm), 1.0), (LexiconReward.keywords(lm.tokenizer, ["dog", "moon"]), 3.0)])


def test_row_chunks_cut_a_large_group_alone_and_pack_small_ones_in_order():
    sizes = [(3, 1, 4, 6), (25, 1, 6, 4), (2, 2, 1, 4), (1, 1, 100, 200)]
    chunks = row_chunks(sizes, budget=100)
    for chunk in chunks[:-1]:  # the last holds the one row longer than the budget, alone
        rows = sum((end - first) * sizes[group][1] for group, first, end in chunk)
        prompt, response = (max(sizes[group][i] for group, _, _ in chunk) for i in (2, 3))
        assert rows * (prompt + response) <= 100  # padded to the longest prompt and the longest response
    assert chunks[-1] == [(3, 0, 1)]
    pieces = [piece for chunk in chunks for piece in chunk]
    assert pieces == [(0, 0, 3), (1, 0, 10), (1, 10, 20), (1, 20, 25), (2, 0, 2), (3, 0, 1)]  # every row once, in order
    for chunk in chunks:
        groups = [g for g, _, _ in chunk]
        assert len(groups) == len(set(groups))  # no two pieces of a group in one pass
    # a group's pieces do not depend on the groups beside it
    alone = [piece for chunk in row_chunks([(25, 1, 6, 4)], budget=100) for piece in chunk]
    assert alone == [(0, 0, 10), (0, 10, 20), (0, 20, 25)]


def test_scoring_in_chunks_equals_scoring_at_once(engine, lm, make_prompt, reward, monkeypatch):
    prefixes = [encode_prefix(lm.model, make_prompt(text).ids) for text in ("write about a dog", "tell me about the moon")]
    specs = [RowSpec(prefix, [(c, w, c.prepare(make_prompt(text))) for c, w in reward.terms], 1.0, True, True, 6, rows)
             for prefix, text, rows in zip(prefixes, ("write about a dog", "tell me about the moon"), (5, 3))]
    tokens = torch.randint(3, lm.model.config.vocab_size, (8, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = evaluate(lm, specs, engine.stop_ids, tokens)
        monkeypatch.setattr(sampling, "ROW_TOKENS_PER_PASS", 2 * held(row_size(specs[0])))
        with positions_run(lm.model.model) as fed:
            chunked = evaluate_in_chunks(lm, specs, engine.stop_ids, tokens)
    assert len(fed) > 2  # it did run in several passes
    for field in ("energy", "reward", "log_prob_ref"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), rtol=1e-5, atol=1e-4)
    assert torch.equal(chunked.mask, whole.mask)


def held(size: tuple[int, int, int]) -> int:
    rows, prompt, response = size
    return rows * (prompt + response)


@contextlib.contextmanager
def tokens_held(backbone):
    """The most tokens (rows × attended positions, prompt included) one forward pass of ``backbone`` held."""
    held = [0]

    def count(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None:
            held[0] = max(held[0], mask.shape[0] * mask.shape[-1])

    hook = backbone.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield held
    finally:
        hook.remove()


def test_many_candidates_and_samples_run_in_bounded_passes(engine, lm, make_prompt, reward, monkeypatch):
    """A request asking for many candidate edits and starting samples (64 × chains rows, say) holds no more than
    ROW_TOKENS_PER_PASS tokens in a pass: its draw and its scoring are cut (one such request exhausted a pod's memory)."""
    prompt = make_prompt("write about a dog")
    config = SEAConfig(max_tokens=8, chains=2, steps=2, candidates=24, init_samples=32, seed=3)

    def request():
        return engine.run([AlignJob(prompt, config, reward)])[0]

    spec_cost = held(row_size(RowSpec(encode_prefix(lm.model, prompt.ids), [(c, w, c.prepare(prompt)) for c, w in reward.terms],
                                        1.0, True, True, 8, 1)))
    budget = 4 * spec_cost  # the chains' gradient pass (2 rows) fits; 48 candidates and 32 samples do not
    with tokens_held(lm.model.model) as unbounded:
        request()
    assert unbounded[0] > budget  # without a bound the passes are larger: the check below can fail
    monkeypatch.setattr(sampling, "ROW_TOKENS_PER_PASS", budget)
    with tokens_held(lm.model.model) as bounded:
        result = request()
    assert 0 < bounded[0] <= budget
    assert all(torch.isfinite(torch.tensor(c.energy)) for c in result.chains)
    # the scores it returns are exact whatever the passes
    spec = RowSpec(encode_prefix(lm.model, prompt.ids), [(c, w, c.prepare(prompt)) for c, w in reward.terms], config.alpha,
                   True, True, 8, len(result.chains))
    with torch.no_grad():
        rescored = evaluate(lm, [spec], engine.stop_ids, torch.tensor([c.tokens for c in result.chains]))
    torch.testing.assert_close(rescored.energy, torch.tensor([c.energy for c in result.chains]), rtol=1e-5, atol=1e-3)


def test_best_of_n_on_a_long_prompt_draws_fewer_at_once(engine, lm, make_prompt, reward, monkeypatch):
    prompt = make_prompt("write about a dog")
    config = SEAConfig(method="bon", samples=12, max_tokens=8, seed=3)
    budget = held(row_size(RowSpec(encode_prefix(lm.model, prompt.ids), [(c, w, c.prepare(prompt)) for c, w in reward.terms],
                                   1.0, True, True, 8, 1)))  # one sample scored under both prompts
    with tokens_held(lm.model.model) as unbounded:
        engine.run([AlignJob(prompt, config, reward)])
    assert unbounded[0] > budget  # all 12 drawn at once
    monkeypatch.setattr(sampling, "ROW_TOKENS_PER_PASS", budget)
    with tokens_held(lm.model.model) as most:
        result = engine.run([AlignJob(prompt, config, reward)])[0]
    assert len(result.chains) == 12 and 0 < most[0] <= budget


@pytest.mark.parametrize("method,extra", [("bon", {"samples": 64}), ("args", {}), ("cbs", {"beams": 2, "successors": 4, "chunk": 2})])
def test_an_abandoned_baseline_stops_drawing(engine, lm, make_prompt, reward, method, extra):
    """Abandoned (its client left, its deadline passed), a baseline stops at the next token it draws, as a SEA start
    does, instead of holding the engine for the rest of its slice of work."""
    prompt = make_prompt("write about a dog")
    config = SEAConfig(method=method, max_tokens=16, seed=3, temperature=1.0, **extra)
    with positions_run(lm.model.model) as whole:
        full = engine.start(AlignJob(prompt, config, reward))
        engine.advance(full)
    assert full.result is not None and not full.cancelled
    passes = [0]

    def abandoned() -> bool:
        return passes[0] >= 3  # after a few forward passes of its run

    def count(module, args, kwargs):
        passes[0] += 1

    hook = lm.model.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with positions_run(lm.model.model) as fed:
            state = engine.start(dataclasses.replace(AlignJob(prompt, config, reward), abandoned=abandoned))
            engine.advance(state)
    finally:
        hook.remove()
    assert state.cancelled and state.done and state.result is None
    assert len(fed) < len(whole) / 2


def test_beam_search_draws_its_successors_in_bounded_passes(engine, lm, make_prompt, reward, monkeypatch):
    prompt = make_prompt("write about a dog")
    config = SEAConfig(method="cbs", beams=4, successors=8, chunk=4, max_tokens=12, seed=3)
    principle = reward.terms[0][0].prepare(prompt)
    budget = 8 * 2 * (max(len(prompt.ids), principle.length) + 12)  # one beam's successors under both prompts
    with tokens_held(lm.model.model) as unbounded:
        engine.run([AlignJob(prompt, config, reward)])
    assert unbounded[0] > budget
    monkeypatch.setattr(sampling, "ROW_TOKENS_PER_PASS", budget)
    with tokens_held(lm.model.model) as most:
        result = engine.run([AlignJob(prompt, config, reward)])[0]
    assert 0 < most[0] <= budget and result.text and len(result.chains) == 4


def test_requests_of_different_lengths_in_one_batch_stay_within_the_bound(engine, lm, make_prompt, reward, monkeypatch):
    """A batch pads every row to its longest request and its longest prompt: passes are sized by what they hold then,
    not by each request's own length (a short request's 48 candidates beside a long one held 2.6 times the bound)."""
    short, long = make_prompt("write about a dog"), make_prompt("tell me a long story about the moon and the sun")
    jobs = [AlignJob(short, SEAConfig(max_tokens=4, chains=2, steps=2, candidates=24, init_samples=24, seed=1), reward),
            AlignJob(long, SEAConfig(max_tokens=40, chains=2, steps=2, seed=2), reward)]
    principle = reward.terms[0][0].prepare(long)
    one_row = 2 * (max(len(long.ids), principle.length) + 40)  # a row of the longest request, under both prompts
    budget = 4 * one_row  # the batch's gradient pass (4 chains) fits
    monkeypatch.setattr(sampling, "ROW_TOKENS_PER_PASS", budget)
    with tokens_held(lm.model.model) as most:
        results = engine.run(jobs)
    assert 0 < most[0] <= budget and all(result.text for result in results)


def test_a_step_whose_requests_were_all_abandoned_stops_between_its_scoring_passes(engine, lm, make_prompt, reward, monkeypatch):
    """A step's edits are scored in bounded passes; one step of 16 chains × 64 candidates × 64 tokens took 292 s on a
    CPU, and a request abandoned (its deadline, a disconnect) at its start held the engine for all of it: the next
    request timed out in the queue. The step now ends at the next pass once nobody waits for any of its requests."""
    prompt = make_prompt("write about a dog")
    config = SEAConfig(chains=2, candidates=16, max_tokens=8, steps=3, seed=2, restart_after=None)
    gone = [False]
    state = engine.start(dataclasses.replace(AlignJob(prompt, config, reward), abandoned=lambda: gone[0]))
    monkeypatch.setattr(sampling, "ROW_TOKENS_PER_PASS", 1)  # one candidate a pass: a pass per edit
    passes = [0]

    def count(module, args, kwargs):
        passes[0] += 1
        gone[0] = passes[0] >= 2  # abandoned while the step runs

    hook = lm.model.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        engine.tick([state])
    finally:
        hook.remove()
    assert state.candidate_rows >= 3 and state.cancelled and state.done and state.result is None
    assert passes[0] == 2  # the gradient pass, the first edit's scoring pass, and nothing after


def test_a_step_cut_short_for_abandoned_requests_still_ends_a_batch_mate_out_of_budget_with_its_result(engine, lm, make_prompt,
                                                                                                       reward, monkeypatch):
    """A request whose budget ran out leaves the step's scoring; when every request still scoring was abandoned, the
    step's end cancelled it too, and its client got 504 instead of its result."""
    prompt = make_prompt("write about a dog")
    gone = [False]
    abandoned = AlignJob(prompt, SEAConfig(chains=2, candidates=16, max_tokens=8, steps=3, seed=2, restart_after=None), reward,
                         abandoned=lambda: gone[0])
    spent = AlignJob(prompt, SEAConfig(chains=1, max_tokens=8, steps=3, seed=2, max_compute=1, restart_after=None), reward)
    states = engine.start_many([abandoned, spent])
    monkeypatch.setattr(sampling, "ROW_TOKENS_PER_PASS", 1)
    hook = lm.model.model.register_forward_pre_hook(lambda module, args, kwargs: gone.__setitem__(0, True), with_kwargs=True)
    try:
        engine.tick(states)
    finally:
        hook.remove()
    assert states[0].cancelled and states[0].result is None
    assert states[1].done and not states[1].cancelled and states[1].result is not None
