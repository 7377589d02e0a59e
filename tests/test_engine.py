"""The SEA engine on tiny random models: energies, gradients, caching, batching, seeds, numerics."""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import math
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from app.engine import sea
from app.engine.energy import REFERENCE, RowSpec, drawn_log_probs, evaluate, passes_per_row, scoring_passes, token_tilt
from app.engine.reuse import shared_starts
from app.engine.sampling import Guide, SampleGroup, Tilt, categorical, drawing_groups, sample_groups, sample_responses
from app.engine.types import AlignJob, SEAConfig
from models.kv import Reuse, stack_prefixes
from models.lm import encode_prefix
from models.rewards import (
    LexiconReward,
    PrincipleReward,
    RewardComponent,
    RewardMix,
    SequenceClassifierReward,
    copied_positions,
    copy_completions,
    limited_log_probs,
)
from models.ste import ResponseBatch, response_mask
from models.tokens import render_prompt
from tests.tiny import positions_run, tiny_reward_model


def _plain_log_prob(lm, prompt_ids, response_ids, one_hot=None):
    """log pi(response | prompt) by one uncached forward over prompt + response (optionally dense one-hot inputs)."""
    model = lm.model
    weight = model.get_input_embeddings().weight
    ids = torch.tensor([prompt_ids + response_ids])
    embeds = F.embedding(ids, weight)
    if one_hot is not None:
        embeds = torch.cat([embeds[:, : len(prompt_ids)], one_hot[None] @ weight], dim=1)
    logits = model(inputs_embeds=embeds).logits[0].float()
    log_probs = F.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)  # (L, V)
    if one_hot is not None:
        return (one_hot * log_probs).sum()
    return log_probs.gather(-1, torch.tensor(response_ids)[:, None]).sum()


def _spec(lm, prompt, terms, rows, length, alpha=1.0):
    prefix = encode_prefix(lm.model, prompt.ids)
    prepared = [(component, weight, component.prepare(prompt)) for component, weight in terms]
    return RowSpec(prefix, prepared, alpha, True, True, length, rows)


def test_energy_equals_plain_uncached_forward(lm, engine, make_prompt):
    prompt = make_prompt("write about a dog in the park")
    principle = PrincipleReward(lm, "be safe and kind")
    tokens = torch.tensor([[30, 31, 32, 33, 34, 35], [40, 41, 42, 43, 44, 45]])
    spec = _spec(lm, prompt, [(principle, 1.0)], rows=2, length=6, alpha=2.0)
    scored = evaluate(lm, [spec], engine.stop_ids, tokens)
    principled_ids = render_prompt(lm.tokenizer, prompt.messages, system="be safe and kind")
    for row in range(2):
        response = tokens[row].tolist()
        log_prob = _plain_log_prob(lm, prompt.ids, response)
        reward = _plain_log_prob(lm, principled_ids, response) - log_prob
        assert scored.log_prob_ref[row] == pytest.approx(float(log_prob), abs=1e-4)
        assert scored.reward[row] == pytest.approx(float(reward), abs=1e-4)
        assert scored.energy[row] == pytest.approx(float(-(log_prob + 2.0 * reward)), abs=1e-4)


def test_cached_gradient_equals_dense_uncached_gradient(lm, engine, make_prompt):
    """The cached, lookup-forward STE gives the same dE/dy as a dense one-hot·W forward without a cache."""
    prompt = make_prompt("tell me about the sun")
    torch.manual_seed(0)
    logits = torch.randn(1, 5, lm.model.config.vocab_size) * 3
    tokens = logits.argmax(-1)
    spec = _spec(lm, prompt, [(LexiconReward.keywords(lm.tokenizer, ["moon"]), 1.0)], rows=1, length=5, alpha=0.0)
    scored = evaluate(lm, [spec], engine.stop_ids, tokens, logits)

    y = logits[0].clone().requires_grad_(True)
    probs = torch.softmax(y, -1)
    hard = F.one_hot(tokens[0], probs.shape[-1]).float()
    straight_through = hard + probs - probs.detach()
    mask = response_mask(tokens, engine.stop_ids)[0]
    assert mask.sum() == 5, "the random tokens must not contain a stop token for this comparison"
    energy = -_plain_log_prob(lm, prompt.ids, tokens[0].tolist(), one_hot=straight_through)
    energy.backward()
    assert scored.energy[0] == pytest.approx(energy.item(), abs=1e-4)
    assert scored.grad is not None and torch.isfinite(scored.grad).all()
    assert scored.grad.abs().sum() > 0
    torch.testing.assert_close(scored.grad[0], y.grad, atol=1e-5, rtol=1e-4)


def test_one_hot_gradient_of_the_principle_energy_equals_the_dense_uncached_gradient(lm, engine, make_prompt):
    """The principle reward runs in the reference's own pass; its gradient is still that of two separate passes."""
    prompt = make_prompt("tell me about the sun")
    principle = PrincipleReward(lm, "be safe and kind")
    tokens = torch.tensor([[30, 31, 32, 33, 34], [44, 43, 42, 41, 40]])
    spec = _spec(lm, prompt, [(principle, 1.0)], rows=2, length=5, alpha=2.0)
    scored = evaluate(lm, [spec], engine.stop_ids, tokens, one_hot_grad=True)
    principled_ids = render_prompt(lm.tokenizer, prompt.messages, system="be safe and kind")
    for row in range(2):
        one_hot = F.one_hot(tokens[row], lm.model.config.vocab_size).float().requires_grad_(True)
        log_prob = _plain_log_prob(lm, prompt.ids, tokens[row].tolist(), one_hot=one_hot)
        energy = -(log_prob + 2.0 * (_plain_log_prob(lm, principled_ids, tokens[row].tolist(), one_hot=one_hot) - log_prob))
        energy.backward()
        assert scored.energy[row] == pytest.approx(energy.item(), abs=1e-4)
        torch.testing.assert_close(scored.grad[row], one_hot.grad, atol=1e-5, rtol=1e-4)


def test_top_k_keeps_no_log_prob_table_alive_through_the_backward_pass(lm, engine, make_prompt, monkeypatch):
    """With top_k the reference's (rows × L × V) log-prob table is built for its top tokens; unless the caller keeps
    it, it must be freed before the backward pass (one table per row and prompt: ~200 MB at 16 chains of 32 tokens
    with the principle on SmolLM2)."""
    vocab = lm.model.config.vocab_size
    spec = _spec(lm, make_prompt("hi there"), [(PrincipleReward(lm), 1.0)], rows=4, length=6)
    tokens = torch.randint(3, vocab, (4, 6), generator=torch.Generator().manual_seed(0))
    held = []
    real = torch.autograd.grad

    def grad(*args, **kwargs):  # the bytes of every live (·, ·, V) float tensor when the backward starts
        held.append(sum(t.untyped_storage().nbytes() for t in gc.get_objects()
                        if issubclass(type(t), torch.Tensor) and t.dim() == 3 and t.shape[-1] == vocab and t.is_floating_point()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    with torch.enable_grad():
        for top_k in (None, 3):
            evaluate(lm, [spec], engine.stop_ids, tokens, one_hot_grad=True, top_k=top_k)
        evaluate(lm, [spec], engine.stop_ids, tokens, one_hot_grad=True, top_k=3, keep_table=True)
    assert held[0] == held[1] < held[2], held


def test_one_hot_gradients_of_requests_batched_together_equal_each_alone(lm, engine, make_prompt):
    """Rows of a batch map to the soft one-hots they were selected from: a joined reward that covers some rows only
    (here the second request's, between two plain ones) must still send each row exactly its own gradient."""
    principle = PrincipleReward(lm, "be safe and kind")
    tokens = torch.tensor([[30, 31, 32, 33, 34], [44, 43, 42, 41, 40], [50, 51, 52, 53, 54], [60, 61, 62, 63, 64]])
    specs = [_spec(lm, make_prompt("hello"), [], rows=1, length=5, alpha=0.0),
             _spec(lm, make_prompt("tell me about the sun"), [(principle, 1.0)], rows=2, length=5, alpha=2.0),
             _spec(lm, make_prompt("a poem"), [], rows=1, length=5, alpha=0.0)]
    together = evaluate(lm, specs, engine.stop_ids, tokens, one_hot_grad=True)
    offset = 0
    for spec in specs:
        rows = slice(offset, offset + spec.rows)
        offset += spec.rows
        alone = evaluate(lm, [spec], engine.stop_ids, tokens[rows], one_hot_grad=True)
        torch.testing.assert_close(together.energy[rows], alone.energy, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(together.grad[rows], alone.grad, atol=1e-5, rtol=1e-4)


def test_positions_after_end_of_turn_do_not_count(lm, engine, make_prompt):
    prompt = make_prompt("hello")
    eos = int(engine.stop_ids[0])
    spec = _spec(lm, prompt, [(LexiconReward.keywords(lm.tokenizer, ["dog"]), 1.0)], rows=2, length=5)
    tokens = torch.tensor([[30, 31, eos, 40, 41], [30, 31, eos, 50, 51]])
    scored = evaluate(lm, [spec], engine.stop_ids, tokens)
    assert scored.mask[0].tolist() == [1, 1, 1, 0, 0]
    assert scored.energy[0] == pytest.approx(float(scored.energy[1]), abs=1e-5)
    text, counted, stopped = engine.text.response(tokens[0])
    assert counted == 3 and stopped and text == lm.tokenizer.decode([30, 31])


def _job(prompt, reward, **config):
    return AlignJob(prompt, SEAConfig(**config), reward)


def _count_device_reads(monkeypatch) -> list[str]:
    """Patches tensors so that every read of their values to the host made by the engine (``.cpu()``, ``.tolist()``,
    ``.item()``, ``float()``, ``int()``, ``bool()``, a boolean mask's indexing, ``nonzero``) is recorded (by call site);
    on a GPU each waits for the device.
    ``to_host``'s unpacking of the one copy it read is not a read."""
    reads: list[str] = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    engine_code = (os.path.join(root, "app") + os.sep, os.path.join(root, "models") + os.sep)
    host_code = os.path.join(root, "app", "engine", "host.py")

    for name in ("cpu", "tolist", "item", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(engine_code) and (caller != host_code or _name == "cpu"):
                reads.append(f"{_name} {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    # Indexing with a boolean mask (and nonzero) reads how many entries are set: a read too.
    index = torch.Tensor.__getitem__

    def indexed(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(engine_code) and any(torch.is_tensor(k) and k.dtype == torch.bool for k in keys):
            reads.append(f"mask index {caller}:{sys._getframe(1).f_lineno}")
        return index(self, key)

    monkeypatch.setattr(torch.Tensor, "__getitem__", indexed)
    for owner in (torch, torch.Tensor):
        nonzero = owner.nonzero

        def counted_nonzero(*args, _original=nonzero, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(engine_code):
                reads.append(f"nonzero {caller}:{sys._getframe(1).f_lineno}")
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, "nonzero", counted_nonzero)
    return reads


@pytest.mark.parametrize(("update", "words", "most"), [("discrete", 0, 8), ("discrete", 4, 10), ("logits", 0, 2)])
def test_a_step_reads_the_device_a_few_times_whatever_its_chains_candidates_and_words(lm, engine, make_prompt, monkeypatch,
                                                                                      update, words, most):
    # Each read of a value on a GPU waits for the queued work: reading per chain or per candidate (as once, ~100 a
    # discrete step at 4 chains × 4 candidates, ~45 a logits step) or per spelling of a rewarded word stalls the
    # device between every few kernels. With `words`, a word-list reward of that many multi-token words (1 against
    # `words`) beside the principle: their phrase moves read once a request.
    def batch(chains: int, candidates: int, word_count: int) -> list:
        terms = [(PrincipleReward(lm), 1.0)]
        if word_count:
            lexicon = LexiconReward.keywords(lm.tokenizer, ["frisbee park river", "onion cry knife", "sun moon", "red blue green"][:word_count])
            assert len(lexicon.phrases()) == word_count  # each spelled with several tokens
            terms.append((lexicon, 3.0))
        return [_job(make_prompt(f"tell me about {i}"), RewardMix(terms), max_tokens=12, chains=chains, candidates=candidates,
                     steps=5, seed=i, restart_after=None, update=update) for i in range(2)]

    sizes = [(2, 2, min(words, 1)), (5, 8, words)]
    states = {size: engine.start_many(batch(*size)) for size in sizes}
    reads = _count_device_reads(monkeypatch)
    per_step = {}
    for size, started in states.items():
        per_step[size] = []
        for _ in range(3):
            before = len(reads)
            engine.tick(started)
            per_step[size].append(len(reads) - before)
        assert not any(s.done for s in started)
    assert per_step[sizes[0]] == per_step[sizes[1]], reads
    assert max(per_step[sizes[1]]) <= most, reads  # 2 requests; discrete: one read per request's proposals, a few for the batch


def test_best_of_n_s_reads_of_the_device_do_not_grow_with_its_samples(lm, engine, make_prompt, monkeypatch):
    """Best-of-N read each sample's scores and tokens one by one (six reads a sample, ~1,500 for a Best-of-256)."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    reads = _count_device_reads(monkeypatch)
    counts = []
    for samples in (2, 8):
        before = len(reads)
        engine.run([_job(make_prompt("tell me a story"), reward, max_tokens=6, method="bon", samples=samples, seed=0)])
        counts.append(len(reads) - before)
    assert counts[0] == counts[1], reads


def test_a_guided_start_reads_the_device_once_a_drawn_token_and_once_for_its_chains(lm, engine, make_prompt, monkeypatch):
    """The principle's guide found the copies a next token would complete by the hits' positions (nonzero): a second
    read of the device for every drawn token of every guided start (the default start), beside the one that asks
    whether every row has stopped, which each group asked apart; and the start's chains were read four numbers at a
    time, chain by chain."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    reads = _count_device_reads(monkeypatch)
    engine.start_many([_job(make_prompt(f"tell me a story about {topic}"), reward, max_tokens=12, chains=6, steps=1, seed=0,
                            init="guided") for topic in ("cats", "the sea", "a boat")])  # three groups, drawn together
    drawing = [read for read in reads if "sampling.py" in read or "host.py" in read]
    assert len(drawing) <= 2 + 12 + 3, reads  # twice to lay the batch out, once a token for every group, once a request's chains


@pytest.mark.parametrize("update", ["discrete", "logits"])
def test_same_seed_same_output_and_other_seed_differs(lm, engine, make_prompt, update):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    prompt = make_prompt("how do i read a book")
    first = engine.run([_job(prompt, reward, max_tokens=8, chains=3, steps=4, seed=7, update=update)])[0]
    again = engine.run([_job(prompt, reward, max_tokens=8, chains=3, steps=4, seed=7, update=update)])[0]
    other = engine.run([_job(prompt, reward, max_tokens=8, chains=3, steps=4, seed=8, update=update)])[0]
    assert [c.tokens for c in first.chains] == [c.tokens for c in again.chains]
    assert [s.energy for s in first.chains[0].trace] == [s.energy for s in again.chains[0].trace]
    assert [c.tokens for c in first.chains] != [c.tokens for c in other.chains]


def test_an_abandoned_start_stops_drawing_and_its_batch_mates_get_what_they_get_alone(lm, engine, make_prompt):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    calls = []

    def abandoned_after_three_tokens() -> bool:
        calls.append(1)
        return len(calls) > 3

    def kept():
        return _job(make_prompt("sing a song"), reward, max_tokens=12, chains=2, steps=2, seed=3, init_samples=4)

    gone = _job(make_prompt("tell me about tea"), reward, max_tokens=12, chains=2, steps=2, seed=5, init_samples=4)
    gone.abandoned = abandoned_after_three_tokens
    states = engine.start_many([kept(), gone])
    assert states[1].cancelled and states[1].done and states[1].result is None and not states[1].initial  # not scored
    assert states[1].usage.forward_token_passes < engine.start(_job(make_prompt("tell me about tea"), reward, max_tokens=12, chains=2,
                                                                     steps=2, seed=5, init_samples=4)).usage.forward_token_passes
    while not states[0].done:
        engine.tick([states[0]])
    alone = engine.run([kept()])[0]
    assert [c.tokens for c in states[0].result.chains] == [c.tokens for c in alone.chains]
    assert states[0].usage == alone.usage


def test_a_request_abandoned_while_a_restart_draws_for_it_is_cancelled_not_given_cut_samples(lm, engine, make_prompt):
    """The restart's draw stopped for it, and its cut-off samples (whose last tokens carried log-prob 0) replaced its
    chains with energies that were not exact, and it ran on."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    gone = _job(make_prompt("what is a boat"), reward, max_tokens=10, chains=2, steps=6, seed=0, init_samples=2, candidates=1,
                max_estimate=-1e9, restart_after=1)  # no edit ever fits: every step after the first restarts
    flag = {"on": False, "calls": 0}

    def abandoned_after_two_tokens() -> bool:
        flag["calls"] += flag["on"]
        return flag["calls"] > 2

    gone.abandoned = abandoned_after_two_tokens
    state = engine.start(gone)
    engine.tick([state])
    before = state.best_energy.clone()
    flag["on"] = True
    engine.tick([state])
    assert state.cancelled and state.done and state.result is None
    assert torch.equal(state.best_energy, before)


def test_a_discrete_trace_marks_a_non_finite_energy(lm, engine, make_prompt):
    """Its entries said finite even when the chain's best energy was not (every starting sample non-finite)."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    state = engine.start(_job(make_prompt("what is a boat"), reward, max_tokens=8, chains=2, steps=1, seed=0, max_estimate=-1e9,
                              restart_after=None))  # no edit is proposed: the step keeps what it has
    state.best_energy[0] = math.inf  # what a model that gives non-finite log-probs leaves
    engine.tick([state])
    assert [chain[-1].finite for chain in state.traces] == [False, True]


def test_a_step_that_runs_out_of_memory_is_retried_as_if_it_had_not_begun(lm, engine, make_prompt, monkeypatch):
    """The worker retries an out-of-memory step in halves: the failed step had already advanced the generators,
    charged its scoring and marked its edits as tried, so the retry drew, charged and chose otherwise."""
    from app.engine import starts

    reward = RewardMix([(PrincipleReward(lm), 1.0)])

    def editing():
        return _job(make_prompt("what is a boat"), reward, max_tokens=8, chains=2, steps=4, seed=8, restart_after=None)

    restarting = _job(make_prompt("sing a song"), reward, max_tokens=8, chains=2, steps=4, seed=5, candidates=1, max_estimate=-1e9,
                      restart_after=1)
    states = engine.start_many([editing(), restarting])
    engine.tick(states)  # the second has no moves: it restarts in the next step, beside the first's edits
    score_drawn, failures = starts._score_drawn, []

    def out_of_memory_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("injected")
        return score_drawn(*args, **kwargs)

    monkeypatch.setattr(starts, "_score_drawn", out_of_memory_once)
    with pytest.raises(torch.OutOfMemoryError):
        engine.tick(states)
    for state in states:  # what the worker does: each half again
        engine.tick([state])
    while not states[0].done:
        engine.tick([states[0]])
    alone = engine.run([editing()])[0]
    assert [[s.energy for s in c.trace] for c in states[0].result.chains] == [[s.energy for s in c.trace] for c in alone.chains]
    assert states[0].usage == alone.usage


@pytest.mark.parametrize("update", ["discrete", "logits", "discrete-restarts"])
def test_chain_results_do_not_depend_on_batch_mates(lm, engine, make_prompt, update):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    keyword = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["cat"]), 2.0)])
    update, restart_after = ("discrete", 1) if update == "discrete-restarts" else (update, None)  # None: edits only
    alone = engine.run([_job(make_prompt("sing a song"), reward, max_tokens=6, chains=2, steps=3, seed=3, update=update,
                             restart_after=restart_after)])[0]
    together = engine.run(
        [
            _job(make_prompt("write a long story about the moon and the sun and the river"), keyword, max_tokens=9, chains=3, steps=5, seed=4,
                 update="discrete", restart_after=1),
            _job(make_prompt("sing a song"), reward, max_tokens=6, chains=2, steps=3, seed=3, update=update, restart_after=restart_after),
            _job(make_prompt("tell me about tea"), keyword, max_tokens=7, chains=2, steps=4, seed=5, update="logits"),
        ]
    )[1]
    assert [c.tokens for c in alone.chains] == [c.tokens for c in together.chains]
    for a, b in zip(alone.chains, together.chains):
        assert [s.energy for s in a.trace] == pytest.approx([s.energy for s in b.trace], abs=1e-4)
    assert alone.usage == together.usage


def test_identical_requests_in_one_batch_each_get_the_answer_alone(lm, engine, make_prompt):
    """The same prompt twice with one seed and one budget (a completion's list of prompts may repeat one): the step
    tells states apart by identity (an equality test of two such states compared their tensors and raised)."""
    reward = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["cat"]), 1.0)])
    prompt = make_prompt("sing a song")
    config = {"max_tokens": 6, "chains": 2, "steps": 50, "seed": 2, "max_compute": 300, "restart_after": 2}
    alone = engine.run([_job(prompt, reward, **config)])[0]
    twice = engine.run([_job(prompt, reward, **config), _job(prompt, reward, **config)])
    for result in twice:
        assert [c.tokens for c in result.chains] == [c.tokens for c in alone.chains] and result.usage == alone.usage
    assert alone.usage.budgeted <= 300 and len(alone.chains[0].trace) < 50  # the budget ended it


def test_a_short_top_k_logits_request_beside_a_longer_one_stays_finite(lm, engine, make_prompt):
    """The logits update with top_k masks each position to the reference's top k; the positions that only pad a
    short request up to its longer batch mate must stay unmasked (an all-masked softmax is NaN, and the keyword
    reward's straight-through presence would carry the NaN into every chain of the short request)."""
    keyword = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["dog", "park"]), 1.0)])
    config = {"chains": 2, "steps": 3, "seed": 1, "update": "logits", "top_k": 5, "alpha": 2.0}
    alone = engine.run([_job(make_prompt("dog park"), keyword, max_tokens=6, **config)])[0]
    together = engine.run([_job(make_prompt("dog park"), keyword, max_tokens=6, **config),
                           _job(make_prompt("dog park"), keyword, max_tokens=12, **config)])[0]
    assert together.nonfinite_steps == 0
    assert all(s.finite for chain in together.chains for s in chain.trace)
    for a, b in zip(alone.chains, together.chains):
        assert [s.energy for s in a.trace] == pytest.approx([s.energy for s in b.trace], abs=1e-4)


def test_a_non_finite_gradient_past_a_short_requests_end_leaves_its_chains_alone(lm, engine, make_prompt, monkeypatch):
    """A short request's rows are padded up to a longer batch mate's length; a non-finite gradient at those padded
    positions (never read) zeroed the short request's whole gradient and counted a non-finite step."""
    from app.engine import discrete

    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    config = {"chains": 2, "steps": 3, "seed": 2, "restart_after": None}
    alone = engine.run([_job(make_prompt("sing a song"), reward, max_tokens=5, **config)])[0]
    real_evaluate, poisoned = discrete.evaluate, []

    def nan_in_the_padding(lm_, specs, *args, **kwargs):
        scored = real_evaluate(lm_, specs, *args, **kwargs)
        if scored.grad is not None and specs[0].length < scored.grad.shape[1]:
            scored.grad[: specs[0].rows, specs[0].length :] = math.nan
            poisoned.append(1)
        return scored

    monkeypatch.setattr(discrete, "evaluate", nan_in_the_padding)
    short, long = engine.run([_job(make_prompt("sing a song"), reward, max_tokens=5, **config),
                              _job(make_prompt("tell me about tea"), reward, max_tokens=9, **config)])
    assert poisoned
    assert short.nonfinite_steps == 0 and long.nonfinite_steps == 0
    assert [c.tokens for c in short.chains] == [c.tokens for c in alone.chains]


@pytest.mark.parametrize("keep_log_probs", [False, True])
def test_groups_sampled_together_draw_what_they_draw_alone(lm, engine, make_prompt, keep_log_probs):
    """Requests started together sample in one batch; prompts, lengths, temperatures and generators differ per group."""
    def groups():
        return [
            SampleGroup(encode_prefix(lm.model, make_prompt("a long prompt about rivers and boats and the sea").ids),
                        3, 9, torch.Generator().manual_seed(1), 1.0, 0.9),
            SampleGroup(encode_prefix(lm.model, make_prompt("hi").ids), 2, 4, torch.Generator().manual_seed(2), 0.0),
            SampleGroup(encode_prefix(lm.model, make_prompt("tea?").ids), 4, 6, torch.Generator().manual_seed(3), 1.5),
            SampleGroup(encode_prefix(lm.model, make_prompt("a boat").ids), 3, 7, torch.Generator().manual_seed(4), 1.0,
                        tilt=Tilt((Guide(encode_prefix(lm.model, make_prompt("be safe").ids), 2.0),), -1.0, 5), greedy_rows=1),
        ]

    alone_groups, together_groups = groups(), groups()
    alone = [sample_groups(lm.model, [group], engine.stop_ids, keep_log_probs)[0] for group in alone_groups]
    together = sample_groups(lm.model, together_groups, engine.stop_ids, keep_log_probs)
    for a, b, group, group_alone in zip(alone, together, together_groups, alone_groups):
        assert b.tokens.shape == (group.n, group.max_tokens)
        assert torch.equal(a.tokens, b.tokens)
        assert a.forward_token_passes == b.forward_token_passes
        if keep_log_probs:
            torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-4, rtol=0)
        # each generator is left where sampling alone leaves it, so the request's later draws match too
        assert torch.equal(group.generator.get_state(), group_alone.generator.get_state())


def test_a_draw_builds_no_graph_and_leaves_the_caller_s_grad_mode_at_each_pause(lm, engine, make_prompt):
    """A draw is resumed between the gradient steps of other requests: it must record no autograd graph (its memory
    would grow with every token) and hand grad mode back as it found it at each pause."""
    group = SampleGroup(encode_prefix(lm.model, make_prompt("a boat").ids), 2, 5, torch.Generator().manual_seed(0), 1.0,
                        tilt=Tilt((Guide(encode_prefix(lm.model, make_prompt("be safe").ids), 2.0),), -1.0, 5))
    with torch.enable_grad():
        draw = drawing_groups(lm.model, [group], engine.stop_ids, keep_log_probs=True)
        pauses, samples = 0, None
        while samples is None:
            try:
                next(draw)
                pauses += 1
                assert torch.is_grad_enabled()
            except StopIteration as end:
                samples = end.value[0]
    assert pauses > 0
    assert not any(t.requires_grad for t in (samples.tokens, samples.log_probs, samples.token_log_probs))


def _token_log_probs(lm, context, response):
    """log pi(response_t | context, response_<t) ``(L,)`` from one uncached pass."""
    log_probs = F.log_softmax(lm.model(input_ids=torch.tensor([context + response])).logits[0].float(), dim=-1)
    return log_probs[len(context) - 1 : -1].gather(1, torch.tensor(response)[:, None])[:, 0]


def _next_log_probs(lm, ids):
    return F.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def _tilted_draw_replayed(lm, engine, prompt, guide, grams=None, clip=float("inf")):
    """Draw one tilted response, and replay it with uncached passes: each token from softmax(−2·log pi_ref +
    3·min(log pi(· | guide), log pi_ref + clip)) over the reference's top 6, where a token completing one of ``grams``
    after the tokens before it takes the reference's log-prob in the guide's place. Returns both and how often a
    top-6 token was so blocked."""
    limit = None if grams is None else functools.partial(limited_log_probs, clip=clip, grams=grams)
    tilt = Tilt((Guide(encode_prefix(lm.model, guide.ids), 3.0, limit),), -2.0, 6)
    drawn = sample_groups(lm.model, [SampleGroup(encode_prefix(lm.model, prompt.ids), 1, 10, torch.Generator().manual_seed(0),
                                                 tilt=tilt)], engine.stop_ids)[0]
    generator = torch.Generator().manual_seed(0)
    expected: list[int] = []
    blocked = 0
    while len(expected) < 10 and not (expected and expected[-1] in engine.stop_ids.tolist()):
        ref, guided = _next_log_probs(lm, prompt.ids + expected), _next_log_probs(lm, guide.ids + expected)
        guided = torch.minimum(guided, ref + clip)
        top = ref.topk(6).indices
        for gram in [] if grams is None else grams.tolist():
            if expected[len(expected) - len(gram) + 1 :] == gram[:-1] and len(expected) >= len(gram) - 1:
                guided[gram[-1]] = ref[gram[-1]]
                blocked += gram[-1] in top.tolist()
        mixed = torch.full_like(ref, float("-inf"))
        mixed[top] = (-2.0 * ref + 3.0 * guided)[top]
        expected.append(int(categorical(torch.softmax(mixed, -1)[None], generator)[0]))
    return drawn, expected, blocked


def test_a_tilted_draw_follows_the_tilted_top_k_of_uncached_passes(lm, engine, make_prompt):
    drawn, expected, _ = _tilted_draw_replayed(lm, engine, make_prompt("tell me about the river"), make_prompt("please be safe"))
    assert drawn.tokens[0, : len(expected)].tolist() == expected
    assert len(set(expected)) > 1  # not one token over and over
    assert drawn.forward_token_passes == 2 * (len(expected) - 1)  # each step runs the row under both prompts


def test_a_tilted_draw_gives_copied_runs_no_guide_bonus(lm, engine, make_prompt):
    prompt, guide = make_prompt("tell me about the river"), make_prompt("please be safe")
    free, _, _ = _tilted_draw_replayed(lm, engine, prompt, guide)
    pairs = free.tokens[0].unfold(0, 2, 1)  # every pair the unblocked draw made: the blocked runs below
    drawn, expected, blocked = _tilted_draw_replayed(lm, engine, prompt, guide, grams=pairs, clip=0.05)
    assert drawn.tokens[0, : len(expected)].tolist() == expected
    assert blocked > 0  # the rule changed the tilted policy at some step


def test_copied_positions_and_completions_of_token_runs():
    grams = torch.tensor([[5, 6, 7], [1, 2, 3]])
    tokens = torch.tensor([[9, 5, 6, 7, 8, 1, 2], [1, 2, 3, 4, 1, 2, 3]])
    assert copied_positions(tokens, grams).int().tolist() == [[0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 1, 1, 1]]
    assert not copied_positions(tokens[:, :2], grams).any()  # shorter than a run
    completes = copy_completions(tokens, grams, vocab=10)
    assert completes[0].nonzero().flatten().tolist() == [3] and not completes[1].any()  # [..., 1, 2] -> 3; [..., 2, 3]
    assert not copy_completions(tokens[:, :1], grams, vocab=10).any()


def test_the_principle_reward_limits_each_token_to_its_clip(lm, engine, make_prompt):
    prompt = make_prompt("how do i make a fire")
    tokens = torch.tensor([[11, 12, 13, 14, 15, 16]])
    system = render_prompt(lm.tokenizer, prompt.messages, system="be safe and kind")
    gains = _token_log_probs(lm, system, tokens[0].tolist()) - _token_log_probs(lm, prompt.ids, tokens[0].tolist())
    clip = float(gains.median())  # some tokens above it, some below
    for limit in (clip, float("inf")):
        spec = _spec(lm, prompt, [(PrincipleReward(lm, "be safe and kind", clip=limit), 1.0)], rows=1, length=6)
        reward = float(evaluate(lm, [spec], engine.stop_ids, tokens).reward[0])
        assert reward == pytest.approx(float(gains.clamp(max=limit).sum()), abs=1e-4)
    assert float(gains.clamp(max=clip).sum()) < float(gains.sum()) - 1e-3


def test_the_principle_reward_pays_nothing_for_reciting_the_principle(lm, engine, make_prompt):
    principle = PrincipleReward(lm, "always be safe and kind to every person you meet")
    prompt = make_prompt("how do i make a fire")
    recital = torch.tensor([lm.tokenizer(" always be safe and kind to every person", add_special_tokens=False)["input_ids"]])
    shuffled = recital[:, torch.randperm(recital.shape[1], generator=torch.Generator().manual_seed(0))]
    assert not copied_positions(shuffled, principle.copy_grams).all()
    spec = _spec(lm, prompt, [(principle, 1.0)], rows=1, length=recital.shape[1])
    assert float(evaluate(lm, [spec], engine.stop_ids, recital).reward[0]) == 0.0
    assert float(evaluate(lm, [spec], engine.stop_ids, shuffled).reward[0]) != 0.0


def test_the_tilt_is_the_per_token_part_of_the_energy(lm, make_prompt):
    prompt = make_prompt("what is a boat")
    principle = PrincipleReward(lm)
    keywords = LexiconReward.keywords(lm.tokenizer, ["boat"])
    tilt = token_tilt(_spec(lm, prompt, [(principle, 0.5), (keywords, 1.0)], rows=1, length=4, alpha=3.0), lm.model, 7)
    assert [guide.weight for guide in tilt.guides] == [1.5] and tilt.ref_weight == -0.5 and tilt.top_k == 7
    assert token_tilt(_spec(lm, prompt, [(keywords, 1.0)], rows=1, length=4), lm.model, 7) is None  # nothing per token
    no_reward = dataclasses.replace(_spec(lm, prompt, [(principle, 1.0)], rows=1, length=4), use_reward=False)
    assert token_tilt(no_reward, lm.model, 7) is None


def test_guided_starts_have_lower_energy_than_base_samples(lm, engine, make_prompt):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    config = {"max_tokens": 8, "chains": 32, "steps": 0, "seed": 3, "init_samples": 32, "alpha": 3.0}
    guided = engine.run([_job(make_prompt("how do i make a fire"), reward, **config, init="guided")])[0]
    base = engine.run([_job(make_prompt("how do i make a fire"), reward, **config, init="sample")])[0]
    assert sum(c.energy for c in guided.chains) < sum(c.energy for c in base.chains)


def test_scoring_charges_the_positions_the_models_run(lm, engine, make_prompt):
    """A scored row is charged the positions each model runs: the reference and the principle reward feed back all
    but the last token (the first one's log-prob comes from their prompts' passes), a reward model reads all L.
    The principle was charged L, one position too many per row."""
    prompt = make_prompt("how do i make a fire")
    reward_model = SequenceClassifierReward(tiny_reward_model(lm.model.config.vocab_size), "rm")
    tokens = torch.randint(30, 40, (3, 7), generator=torch.Generator().manual_seed(0))  # no stop token: full length
    specs = [_spec(lm, prompt, terms, rows=3, length=7)
             for terms in ([(PrincipleReward(lm), 1.0)], [(reward_model, 1.0)], [(PrincipleReward(lm), 1.0), (reward_model, 0.5)])]
    with positions_run(lm.model.model, reward_model.backbone) as fed:
        for spec in specs:
            fed.clear()
            evaluate(lm, [spec], engine.stop_ids, tokens)
            assert sum(fed) == passes_per_row(spec) * 3, [component.name for component, _, _ in spec.reward_terms]


def test_drawn_samples_are_scored_from_their_draw_as_a_full_pass_scores_them(lm, make_prompt):
    """A draw computes each token's log-prob under the reference (and, guided, under the guide prompts): scoring
    from those equals a full scoring pass, with stops inside the responses, and costs only the passes not drawn."""
    prompt = make_prompt("how do i make a fire")
    terms = [(PrincipleReward(lm), 1.0), (LexiconReward.keywords(lm.tokenizer, ["fire"]), 0.5)]
    stops = torch.arange(40, 52)  # many stop tokens, so that some responses end early
    spec = _spec(lm, prompt, terms, rows=6, length=7, alpha=3.0)
    tilt = token_tilt(spec, lm.model, 20)
    groups = [SampleGroup(spec.prefix, 6, 7, torch.Generator().manual_seed(seed), tilt=group_tilt)
              for seed, group_tilt in ((1, tilt), (2, None))]
    stopped = 0
    for group, samples in zip(groups, sample_groups(lm.model, groups, stops)):
        known = drawn_log_probs(samples.token_log_probs, group.tilt)
        assert set(known) == ({REFERENCE, terms[0][0]} if group.tilt else {REFERENCE})
        full = evaluate(lm, [spec], stops, samples.tokens)
        drawn = evaluate(lm, [spec], stops, samples.tokens, known=known)
        for name in ("energy", "reward", "log_prob_ref"):
            torch.testing.assert_close(getattr(drawn, name), getattr(full, name), rtol=1e-4, atol=1e-4)
        stopped += int((full.mask.sum(1) < 7).sum())
        assert passes_per_row(spec, known=frozenset(known)) == (0 if group.tilt else 6)  # the principle's pass is left
    assert passes_per_row(spec) == 6 + 6 and stopped > 0  # the principle too feeds back all but the last token


def test_a_continued_draw_is_scored_from_its_parents_and_its_own_log_probs(lm, make_prompt):
    """Chunk-level beam search continues drawn beams (``given``): the beams' log-probs and the continuation's
    score the candidates as a full pass does, with stops inside the beams and inside the continuations."""
    prompt = make_prompt("tell me about the sea")
    stops = torch.arange(40, 52)
    generator = torch.Generator().manual_seed(4)
    parents = sample_responses(lm.model, encode_prefix(lm.model, prompt.ids), 8, 3, stops, generator)
    more = sample_responses(lm.model, encode_prefix(lm.model, prompt.ids), 8, 4, stops, generator, given=parents.tokens)
    spec = _spec(lm, prompt, [(PrincipleReward(lm), 1.0)], rows=8, length=7, alpha=3.0)
    known = {REFERENCE: torch.cat([parents.token_log_probs[:, 0], more.token_log_probs[:, 0]], dim=1)}
    full = evaluate(lm, [spec], stops, more.tokens)
    drawn = evaluate(lm, [spec], stops, more.tokens, known=known)
    torch.testing.assert_close(drawn.energy, full.energy, rtol=1e-4, atol=1e-4)
    ended = full.mask.sum(1)
    assert bool((ended <= 3).any()) and bool(((ended > 3) & (ended < 7)).any())  # stops in both parts


def test_a_guided_start_includes_the_greedy_tilted_decode_which_is_the_args_answer(lm, engine, make_prompt):
    """For a contrastive reward, ARGS's greedy pick (reference top-k by log pi_ref + alpha·r) is the tilted policy's
    greedy decode, so a guided SEA start holds ARGS's answer and SEA by energy is never worse than ARGS."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    prompt = make_prompt("how do i make a fire")
    args = engine.run([_job(prompt, reward, max_tokens=8, alpha=3.0, method="args", args_top_k=10, temperature=0.0)])[0]
    sea = engine.run([_job(prompt, reward, max_tokens=8, alpha=3.0, chains=4, init_samples=4, steps=0, seed=1, select="energy")])[0]
    assert args.chains[0].tokens in [c.tokens for c in sea.chains]
    assert sea.energy <= args.energy + 1e-5


def test_guided_and_base_starts_are_the_same_for_a_reward_with_no_per_token_part(lm, engine, make_prompt):
    keywords = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["boat", "river"]), 1.0)])
    config = {"max_tokens": 8, "chains": 2, "steps": 3, "seed": 3}
    guided = engine.run([_job(make_prompt("tell me a story"), keywords, **config, init="guided")])[0]
    base = engine.run([_job(make_prompt("tell me a story"), keywords, **config, init="sample")])[0]
    assert [c.tokens for c in guided.chains] == [c.tokens for c in base.chains] and guided.usage == base.usage


@pytest.mark.parametrize("update", ["discrete", "logits"])
def test_trace_has_one_entry_per_step_and_best_is_never_worse_than_initial(lm, engine, make_prompt, update):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    result = engine.run([_job(make_prompt("what is a boat"), reward, max_tokens=8, chains=4, steps=6, seed=1, update=update)])[0]
    assert result.timings.steps == 6
    for chain in result.chains:
        assert len(chain.trace) == 6
        assert chain.energy <= chain.initial.energy + 1e-6
        energies = [chain.initial.energy] + [s.energy for s in chain.trace]
        assert chain.energy == pytest.approx(min(energies), abs=1e-5)
    assert result.reward == max(c.reward for c in result.chains)
    assert result.usage.backward_token_passes > 0 and result.usage.forward_token_passes > result.usage.backward_token_passes


@pytest.mark.parametrize("update", ["discrete", "logits"])
def test_keyword_reward_rises_over_the_steps(lm, engine, make_prompt, update):
    reward = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["penguin", "violin"]), 1.0)])
    job = _job(make_prompt("tell me about your morning"), reward, max_tokens=8, chains=4, steps=15, seed=0,
               alpha=20.0, step_size=0.5, select="reward", update=update)
    result = engine.run([job])[0]
    initial = sum(c.initial.reward for c in result.chains) / len(result.chains)
    final = sum(c.reward for c in result.chains) / len(result.chains)
    assert initial < 1.0
    assert final > initial
    assert max(c.trace[-1].reward for c in result.chains) > 0


def test_select_by_energy_returns_lowest_energy_chain(lm, engine, make_prompt):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    result = engine.run([_job(make_prompt("hello"), reward, max_tokens=6, chains=4, steps=2, seed=2, select="energy")])[0]
    assert result.energy == min(c.energy for c in result.chains)


def test_equal_rewards_go_to_the_chain_that_reads_best_per_token():
    """A word-list reward ties often; the energy's sum over tokens would favour a short fragment holding the same
    words (here: lower energy, worse per token), so the tie goes to log pi_ref per token."""
    from app.engine.types import ChainResult, StepStats, best_chain, chain_order

    made = itertools.count()

    def chain(reward, log_prob, counted, energy=0.0, tokens=None):
        tokens = [next(made)] if tokens is None else tokens
        return ChainResult("", tokens, reward, log_prob, energy, 0, StepStats(energy, reward, log_prob, 0.0, True), [], counted)

    fragment, sentence, poorer = chain(50.0, -30.0, 4, energy=-20.0), chain(50.0, -60.0, 24, energy=10.0), chain(25.0, -20.0, 24)
    assert best_chain([fragment, sentence, poorer], "reward") == 1
    assert best_chain([poorer, sentence, fragment], "reward") == 1
    assert best_chain([fragment, sentence, poorer], "energy") == 0
    assert chain_order([fragment, poorer, sentence], "reward") == [2, 0, 1]  # /v1's n choices come in this order
    assert best_chain([chain(50.0, -60.0, 24, energy=math.nan), fragment], "reward") == 1  # non-finite never wins
    # the same tokens scored a last bit apart (batch-dependent float noise): the first of them, whichever scored higher
    twin, same = chain(0.09064578, -9.0, 5, energy=3.0, tokens=[7, 8]), chain(0.09064579, -9.0, 5, energy=2.9999999, tokens=[7, 8])
    assert best_chain([twin, same], "reward") == 0 and best_chain([twin, same], "energy") == 0


def test_picking_by_reward_starts_chains_from_samples_that_read_well_not_from_short_ones():
    """Starting samples compete on the energy with the reference term per token over max_tokens when the pick is by
    reward; by energy, on the energy (SEA then never returns worse than Best-of-N by energy from the same draws)."""
    import types

    from app.engine.starts import _start_rank

    def state(select):
        return types.SimpleNamespace(config=SEAConfig(select=select), spec=types.SimpleNamespace(length=24))

    # a 3-token fragment (-15 nats, -5 a token) and a full answer (-48, -2 a token), both with reward 25, alpha 1
    log_prob, reward, counted = torch.tensor([-15.0, -48.0]), torch.tensor([25.0, 25.0]), torch.tensor([3, 24])
    energy = -(log_prob + reward)
    assert torch.argsort(_start_rank(state("energy"), energy, log_prob, counted)).tolist() == [0, 1]
    ranks = _start_rank(state("reward"), energy, log_prob, counted)
    assert torch.argsort(ranks).tolist() == [1, 0]
    assert ranks.tolist() == pytest.approx([24 * 5.0 - 25, 48 - 25])
    nan = _start_rank(state("reward"), torch.tensor([math.inf]), torch.tensor([math.nan]), torch.tensor([3]))
    assert nan.tolist() == [math.inf]


def test_a_restart_keeps_the_chain_the_pick_by_reward_would_return(lm, engine, make_prompt, monkeypatch):
    """Samples replace the chain they out-rank most, but never the one the pick would return unless the pick prefers
    the sample: a short chain holding the top reward ranks worst per token and must not be swapped for less reward."""
    from app.engine import starts
    from app.engine.energy import Evaluation

    length = 12
    reward = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["river"]), 1.0)])
    for sample_reward, kept in ((5.0, [10.0, 5.0]), (12.0, [12.0, 0.0])):
        state = engine.start(_job(make_prompt("tell me about tea"), reward, max_tokens=length, chains=2, steps=10, seed=0,
                                  restart_after=1))
        # chain 0: a 3-token fragment with the top reward (worst per token); chain 1: a full reply without it
        state.best_reward, state.best_log_prob = torch.tensor([10.0, 0.0]), torch.tensor([-15.0, -30.0])
        state.best_energy, state.counted = -(state.best_log_prob + state.best_reward), torch.tensor([3, length])
        fresh = state.tokens[1:2].clone()
        fresh[0, 0] = next(t for t in range(5, 50) if t not in state.tokens[:, 0].tolist())  # held by no chain
        drawn = Evaluation(fresh, torch.ones(1, length), torch.tensor([20.0 - sample_reward]),
                           torch.tensor([sample_reward]), torch.tensor([-20.0]), None, None, None)
        with monkeypatch.context() as patch:  # the restart draws this one sample
            patch.setattr(starts, "_draw_samples", lambda engine, states, counts, first=False: [None])
            patch.setattr(starts, "_score_drawn", lambda engine, states, drawn_samples, drawn=drawn: (drawn, [slice(0, 1)]))
            starts.restart(engine, [state])
        assert state.best_reward.tolist() == kept


def test_restarts_of_the_ablation_without_the_reference_leave_every_chain_s_energy_as_it_was(lm, engine, make_prompt):
    """Without the reference (the paper's ablation) a chain's rank at a restart is its energy tensor itself, and marking
    the chain the pick keeps wrote -inf into it: chains reported energy -inf, took no more edits, and the pick by
    reward returned the wrong one."""
    principle = RewardMix([(PrincipleReward(lm, "be safe and kind"), 1.0)])
    for seed in (1, 2):
        result = engine.run([_job(make_prompt("tell me about the dog"), principle, seed=seed, max_tokens=6, chains=2, steps=12,
                                  use_reference=False)])[0]
        assert all(math.isfinite(chain.energy) for chain in result.chains) and math.isfinite(result.energy)
        assert result.chosen == max(range(2), key=lambda i: result.chains[i].reward)


def test_a_keyword_reward_serves_sea_after_a_baseline_used_it_and_with_no_word_to_find(lm, engine, make_prompt):
    """Its spelling tables were cached from their first use: under a baseline's inference mode they were inference
    tensors that a later SEA run could not save for its backward. With no spellable word, the table of ids was a float
    tensor and indexing with it failed."""
    keywords = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["dog", "frisbee"]), 1.0)])
    prompt = make_prompt("tell me about the dog")
    engine.run([_job(prompt, keywords, seed=1, max_tokens=6, method="bon", samples=2)])
    assert math.isfinite(engine.run([_job(prompt, keywords, seed=1, max_tokens=6, chains=2, steps=2)])[0].energy)
    nothing = RewardMix([(LexiconReward.keywords(lm.tokenizer, []), 1.0)])
    for update in ("discrete", "logits"):
        result = engine.run([_job(prompt, nothing, seed=1, max_tokens=5, chains=2, steps=2, update=update)])[0]
        assert result.reward == 0.0 and math.isfinite(result.energy)


def test_a_one_token_answer_under_a_compute_budget_runs(lm, engine, make_prompt):
    """Scoring a one-token answer costs no pass (its log-probs come from the prompts' passes): sizing the step's edits
    to the budget divided by that cost raised ZeroDivisionError, a 500 for the request and, batched, for every other."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    result = engine.run([_job(make_prompt("the dog"), reward, seed=0, max_tokens=1, chains=2, steps=2, max_compute=100)])[0]
    assert math.isfinite(result.energy) and result.usage.budgeted <= 100


class _NaNAfterFirstScore(RewardComponent):
    """A reward that is finite for the initial chains and NaN afterwards."""

    name = "nan"
    lm_passes = 0

    def __init__(self):
        self.calls = 0

    def prepare(self, prompt):
        return None

    def score(self, contexts, response):
        self.calls += 1
        value = torch.zeros(response.rows) if self.calls == 1 else torch.full((response.rows,), math.nan)
        if response.probs is not None:
            value = value + 0.0 * response.soft().sum((1, 2))
        return value


def test_non_finite_energies_never_become_the_result(lm, engine, make_prompt):
    result = engine.run([_job(make_prompt("hello"), RewardMix([(_NaNAfterFirstScore(), 1.0)]), max_tokens=6, chains=2, steps=3, seed=0,
                              update="logits")])[0]
    assert math.isfinite(result.energy)
    for chain in result.chains:
        assert chain.best_step == 0
        assert [s.finite for s in chain.trace] == [False, False, False]
    assert result.nonfinite_steps >= 1


def test_discrete_update_never_accepts_a_non_finite_candidate(lm, engine, make_prompt):
    result = engine.run([_job(make_prompt("hello"), RewardMix([(_NaNAfterFirstScore(), 1.0)]), max_tokens=6, chains=2, steps=3, seed=0)])[0]
    assert math.isfinite(result.energy)
    for chain in result.chains:
        assert chain.best_step == 0 and chain.tokens and all(s.energy == chain.initial.energy for s in chain.trace)


def test_a_start_drawn_in_slices_starts_the_chains_it_starts_in_one_go(lm, engine, make_prompt):
    """The service draws a joining request's initial samples a token at a time between the batch's steps."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    jobs = lambda: [_job(make_prompt(prompt), reward, max_tokens=6, chains=3, steps=3, seed=seed, init=init)
                    for prompt, seed, init in (("the dog", 1, "guided"), ("tell me a story", 2, "sample"), ("hello", 3, "random"))]
    whole = engine.run(jobs())
    states = engine.start_many(jobs(), sliced=True)
    starting = states[0].starting
    assert starting is not None and all(state.starting is starting for state in states) and states[0].step == -1
    slices = 1
    while not engine.advance_start(starting, 0.0):
        slices += 1
    assert slices > 6 and all(state.starting is None and state.step == 0 for state in states)
    while not all(state.done for state in states):
        engine.tick([state for state in states if not state.done])
    assert [[c.tokens for c in s.result.chains] for s in states] == [[c.tokens for c in r.chains] for r in whole]
    assert [s.result.usage for s in states] == [r.usage for r in whole]
    abandoned = engine.start_many(jobs(), sliced=True)  # all cancelled: the start closed, no state holds it (a cycle)
    engine.advance_start(abandoned[0].starting, 0.0)
    run = abandoned[0].starting.run
    for state in abandoned:
        engine.cancel(state)
    assert all(state.starting is None for state in abandoned) and run.gi_frame is None


def test_early_stop_with_patience(lm, engine, make_prompt):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    result = engine.run([_job(make_prompt("hello"), reward, max_tokens=6, chains=2, steps=50, seed=0, patience=2, step_size=0.0, noise=0.0,
                              update="logits")])[0]
    assert result.timings.steps == 2  # zero step size: nothing ever improves
    last = engine.run([_job(make_prompt("hello"), reward, max_tokens=6, chains=2, steps=50, seed=0, patience=2, step_size=0.0, noise=0.0,
                            update="logits", track_best=False)])[0]
    assert last.timings.steps == 2  # returning the last iterate counted every finite step as an improvement: all 50 ran


def test_top_k_decoding_keeps_tokens_within_reference_top_k(lm, engine, make_prompt):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    state = engine.start(_job(make_prompt("tell me about tea"), reward, max_tokens=6, chains=2, steps=4, seed=0, top_k=3, step_size=2.0,
                              update="logits"))
    engine.tick([state])  # scores the initial chains and stores the reference top-k of each position
    for _ in range(3):
        candidates = state.top_k[..., :3]
        engine.tick([state])
        assert bool((state.tokens[..., None] == candidates).any(-1).all())


def test_straight_through_columns_and_embedding_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    probs = torch.softmax(logits, -1)
    tokens = logits.argmax(-1)
    batch = ResponseBatch(tokens=tokens, mask=torch.ones(2, 3), probs=probs)
    cols = batch.columns(torch.tensor([1, 4]))
    assert torch.equal(cols.detach(), (tokens[..., None] == torch.tensor([1, 4])).float())
    weight = torch.randn(7, 5)
    batch.embed(weight).sum().backward()
    dense_logits = logits.detach().clone().requires_grad_(True)
    dense_probs = torch.softmax(dense_logits, -1)
    hard = F.one_hot(tokens, 7).float()
    ((hard + dense_probs - dense_probs.detach()) @ weight).sum().backward()
    torch.testing.assert_close(logits.grad, dense_logits.grad)


@pytest.mark.parametrize("proposal", ["gradient", "lm"])
def test_discrete_energy_never_rises_and_stays_exact(lm, engine, make_prompt, proposal):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    prompt = make_prompt("what is a boat")
    result = engine.run([_job(prompt, reward, max_tokens=8, chains=3, steps=6, seed=2, init_samples=6, proposal=proposal,
                              init="sample", restart_after=None)])[0]
    assert any(c.energy < c.initial.energy - 1e-6 for c in result.chains)  # edits lowered it
    _assert_energies_only_fall_and_are_exact(lm, engine, prompt, reward, result, length=8)


def _assert_energies_only_fall_and_are_exact(lm, engine, prompt, reward, result, length):
    spec = _spec(lm, prompt, [(c, w) for c, w in reward.terms], rows=1, length=length)
    for chain in result.chains:
        energies = [s.energy for s in chain.trace]
        assert all(b <= a + 1e-6 for a, b in itertools.pairwise(energies))
        assert chain.energy <= chain.initial.energy + 1e-6  # the sample it (re)started from
        rescored = evaluate(lm, [spec], engine.stop_ids, torch.tensor([chain.tokens]))
        assert float(rescored.energy[0]) == pytest.approx(chain.energy, abs=1e-4)


def test_phrase_moves_bring_in_words_of_several_tokens(lm, engine, make_prompt):
    """Three-token "words" (the tiny tokenizer splits at spaces): a single or paired edit gains nothing until all
    three tokens stand together, so without phrase moves SEA seldom finds them; with them, nearly always."""
    reward = RewardMix([(LexiconReward(lm.tokenizer, {"frisbee park river": 1.0, "onion cry knife": 1.0}), 20.0)])
    assert reward.phrases() == [[tuple(lm.tokenizer("frisbee park river", add_special_tokens=False)["input_ids"])],
                                [tuple(lm.tokenizer("onion cry knife", add_special_tokens=False)["input_ids"])]]
    found = {}
    for phrase_moves in (True, False):
        results = [engine.run([_job(make_prompt("tell me about tea"), reward, max_tokens=10, chains=2, steps=6, seed=seed,
                                    phrase_moves=phrase_moves)])[0] for seed in range(6)]
        found[phrase_moves] = sum(round(result.reward / 20.0) for result in results)  # words in the returned answers, of 12
        for result in results:
            _assert_energies_only_fall_and_are_exact(lm, engine, make_prompt("tell me about tea"), reward, result, length=10)
    assert found[True] >= 10 and found[False] <= 4, found


def test_discrete_top_k_edits_only_to_the_reference_top_k(lm, engine, make_prompt):
    """With top_k, an edit puts at its first changed position one of the reference's top-k tokens there (the
    context before it is unchanged); without, the reward's gradient leads elsewhere too."""
    reward = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["river", "onion"]), 5.0)])
    prompt = make_prompt("tell me about tea")
    outside = {}
    for top_k in (3, None):
        outside[top_k] = edited = 0
        for seed in range(5):
            config = {"max_tokens": 10, "chains": 2, "seed": seed, "top_k": top_k, "restart_after": None, "phrase_moves": False}
            start = engine.run([_job(prompt, reward, steps=0, **config)])[0]
            after = engine.run([_job(prompt, reward, steps=1, **config)])[0]
            for before, chain in zip(start.chains, after.chains):
                changed = [t for t, (a, b) in enumerate(zip(before.tokens, chain.tokens)) if a != b]
                if not changed:
                    continue
                edited += 1
                t = changed[0]
                ids = torch.tensor([prompt.ids + before.tokens[:t]])
                top = lm.model(ids).logits[0, -1].topk(3).indices.tolist()
                outside[top_k] += chain.tokens[t] not in top
        assert edited > 0
    assert outside[3] == 0 and outside[None] > 0, outside


@pytest.mark.parametrize("update", ["discrete", "logits"])
def test_a_top_k_past_the_vocabulary_means_the_whole_vocabulary(lm, engine, make_prompt, update):
    reward = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["river"]), 5.0)])
    vocabulary = lm.model.config.vocab_size
    runs = [engine.run([_job(make_prompt("tell me about tea"), reward, max_tokens=6, chains=2, steps=2, seed=1, update=update,
                             top_k=top_k)])[0] for top_k in (vocabulary + 5, vocabulary)]
    assert [c.tokens for c in runs[0].chains] == [c.tokens for c in runs[1].chains]


def test_discrete_chains_start_from_the_best_initial_samples(lm, engine, make_prompt):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    job = _job(make_prompt("what is a boat"), reward, max_tokens=6, chains=2, steps=0, seed=4, init_samples=8, select="energy",
               init="sample")
    bon = engine.run([_job(make_prompt("what is a boat"), reward, max_tokens=6, seed=4, method="bon", samples=8, select="energy")])[0]
    sea = engine.run([job])[0]
    assert sea.energy == pytest.approx(bon.energy, abs=1e-5)  # same draws: the best of 8 by exact energy
    assert sorted(c.energy for c in sea.chains) == pytest.approx(sorted(c.energy for c in bon.chains)[:2], abs=1e-5)


def test_a_request_is_charged_the_prompt_encodings_it_runs(lm, engine, make_prompt):
    """The reference's prompt, and each reward's own context: the principle's prompt is longer (the principle as
    the system turn), a word list encodes none."""
    prompt = make_prompt("what is a boat")
    principle = PrincipleReward(lm)
    keywords = LexiconReward.keywords(lm.tokenizer, ["boat"])
    principled = render_prompt(lm.tokenizer, prompt.messages, system=principle.principle)
    for terms, expected in (([(keywords, 1.0)], len(prompt.ids)), ([(principle, 1.0), (keywords, 1.0)], len(prompt.ids) + len(principled))):
        usage = engine.run([_job(prompt, RewardMix(terms), max_tokens=4, chains=1, steps=1, seed=0)])[0].usage
        assert usage.prompt_token_passes == expected


def test_compute_budget_stops_the_request(lm, engine, make_prompt):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    unlimited = engine.run([_job(make_prompt("hi"), reward, max_tokens=6, chains=2, steps=20, seed=1)])[0]
    budget = unlimited.usage.compute // 3
    limited = engine.run([_job(make_prompt("hi"), reward, max_tokens=6, chains=2, steps=20, seed=1, max_compute=budget)])[0]
    spent = limited.usage.compute - limited.usage.prompt_token_passes  # a budget is for the response's work
    assert limited.usage.prompt_token_passes > 0 and spent <= budget < unlimited.usage.compute
    assert limited.timings.steps < 20


@pytest.mark.parametrize("proposal", ["gradient", "lm"])
def test_a_compute_budget_is_spent_until_not_even_one_chains_step_fits(lm, engine, make_prompt, proposal):
    """When a whole step of every chain no longer fits the budget, the chains that fit still take it."""
    reward = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["moon", "river"]), 50.0)])  # no LM passes: a row costs L − 1
    length, chains = 8, 4
    # the dearest step of one chain: its gradient pass (3 passes; the gradient-free ablation's table pass, 1) and one edit
    one_chain_step = (4 if proposal == "gradient" else 2) * (length - 1)
    for budget in range(400, 700, 37):
        result = engine.run([_job(make_prompt("tell me a story"), reward, max_tokens=length, chains=chains, steps=10_000, seed=3,
                                  init="sample", max_compute=budget, proposal=proposal)])[0]
        assert budget - one_chain_step < result.usage.compute - result.usage.prompt_token_passes <= budget, budget


def test_scoring_without_a_table_matches_the_full_log_softmax_in_any_chunking(lm, make_prompt, monkeypatch):
    """Exact scoring picks logit − logsumexp a few rows at a time instead of building the (B, L, V) table."""
    import models.lm as lm_module

    prefix = stack_prefixes([encode_prefix(lm.model, make_prompt("a question about rain").ids)] * 5)
    tokens = torch.randint(0, lm.model.config.vocab_size, (5, 7), generator=torch.Generator().manual_seed(0))
    response = ResponseBatch(tokens=tokens, mask=torch.ones(5, 7))
    with torch.no_grad():
        _, table = lm_module.response_token_log_probs(lm.model, prefix, response, return_table=True)
        expected = table.gather(-1, tokens[..., None])[..., 0]
        for chunk_rows in (1, 2, 5):
            monkeypatch.setattr(lm_module, "LOGIT_CHUNK_ELEMENTS", chunk_rows * 6 * lm.model.config.vocab_size)
            picked = lm_module.response_token_log_probs(lm.model, prefix, response)
            torch.testing.assert_close(picked, expected, atol=1e-5, rtol=0)


def test_jobs_started_together_count_the_whole_start_as_engine_time(lm, engine, make_prompt, monkeypatch):
    """The last of several jobs started together waited for every job's prompt encoding; its engine time says so.

    (Its queue wait ends when the batch's start begins, so time not counted here would show up nowhere.)
    """
    import app.engine.sea as sea_module

    encode = sea_module.encode_prefix
    delay = 0.2

    def slow_encode(model, ids):
        time.sleep(delay)
        return encode(model, ids)

    monkeypatch.setattr(sea_module, "encode_prefix", slow_encode)
    reward = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["cat"]), 1.0)])
    jobs = [_job(make_prompt(f"prompt {i}"), reward, max_tokens=4, chains=1, steps=1, seed=i) for i in range(3)]
    before = time.perf_counter()
    states = engine.start_many(jobs)
    elapsed = time.perf_counter() - before
    for state in states:
        assert 3 * delay <= state.timings.init <= elapsed


def test_edits_scored_from_their_sources_memory_match_a_full_pass(lm, engine, make_prompt, monkeypatch):
    """An edit runs only from its first edited position on, reading the unchanged head from its source's memory,
    and scores exactly what a full pass scores: reference, principle reward and keyword reward, across prompts
    of different lengths, with an edit that ends the response early. The principle reward runs in the
    reference's own forward calls."""
    import models.lm as lm_module

    principle = PrincipleReward(lm, "be safe and kind")
    keyword = LexiconReward.keywords(lm.tokenizer, ["cat"])
    specs = [_spec(lm, make_prompt("write a long story about the moon and the river"), [(principle, 1.0), (keyword, 2.0)], 2, 7),
             _spec(lm, make_prompt("hi"), [(principle, 1.0)], 1, 7, alpha=3.0)]
    sources = torch.tensor([[30, 31, 32, 33, 34, 35, 36], [40, 41, 42, 43, 44, 45, 46], [50, 51, 52, 53, 54, 55, 56]])
    with torch.enable_grad():
        recorded = evaluate(lm, specs, engine.stop_ids, sources, one_hot_grad=True, record=True)
    stop = int(engine.stop_ids[0])
    edits, source_rows, starts = [], [], []
    for row, (position, token) in enumerate([(0, 60), (3, 61), (6, 62), (1, stop), (5, 63)]):
        source = [0, 0, 1, 1, 2][row]
        edit = sources[source].clone()
        edit[position] = token
        edits.append(edit)
        source_rows.append(source)
        starts.append(max(position - 1, 0))
    edit_specs = [dataclasses.replace(specs[0], rows=4), dataclasses.replace(specs[1], rows=1)]
    memories = {key: memory.rows(torch.tensor(source_rows)) for key, memory in recorded.memories.items()}
    assert len(memories) == 2  # the reference and the principle reward
    run_lengths = []
    forward = lm_module.forward_after_prefix
    monkeypatch.setattr(lm_module, "forward_after_prefix", lambda *a, **k: run_lengths.append(a[2].shape[:2]) or forward(*a, **k))
    with torch.no_grad():
        resumed = evaluate(lm, edit_specs, engine.stop_ids, torch.stack(edits), reuse=Reuse(torch.tensor(starts), memories))
        resumed_lengths, run_lengths[:] = list(run_lengths), []
        full = evaluate(lm, edit_specs, engine.stop_ids, torch.stack(edits))
    torch.testing.assert_close(resumed.log_prob_ref, full.log_prob_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(resumed.reward, full.reward, atol=1e-4, rtol=0)
    torch.testing.assert_close(resumed.energy, full.energy, atol=1e-4, rtol=0)
    # The reference and the principle reward (the same network) share one call per start, and a full pass is
    # one call too; a resumed row runs only its positions from its start on.
    assert sorted(resumed_lengths) == sorted((2 * starts.count(s), 6 - s) for s in set(starts))
    assert run_lengths == [(10, 6)]
    assert sum(rows * length for rows, length in resumed_lengths) < sum(rows * length for rows, length in run_lengths)
    # and each edit is charged the positions it ran (the principle was charged one more per row)
    assert sum(rows * length for rows, length in resumed_lengths) == sum(passes_per_row(specs[0], start) for start in starts)


def _brute_force_grouping_cost(needs: list[int], length: int, overhead: int) -> float:
    values = sorted(set(needs))
    best = math.inf
    for cuts in itertools.product([False, True], repeat=len(values) - 1):  # where a new group begins
        cost, start = 0.0, values[0]
        groups = [[values[0]]]
        for value, cut in zip(values[1:], cuts):
            groups.append([value]) if cut else groups[-1].append(value)
        for group in groups:
            start = group[0]
            cost += overhead + sum(needs.count(v) for v in group) * (length - 1 - start)
        best = min(best, cost)
    return best


@pytest.mark.parametrize("overhead", [0, 3, 8, 100])
def test_edits_share_the_cheapest_starts(overhead):
    generator = torch.Generator().manual_seed(overhead)
    for _ in range(20):
        length = int(torch.randint(2, 12, (1,), generator=generator))
        first_edited = torch.randint(0, length, (int(torch.randint(1, 9, (1,), generator=generator)),), generator=generator).tolist()
        starts = shared_starts(first_edited, length, overhead)
        assert all(0 <= s <= max(t - 1, 0) for s, t in zip(starts, first_edited))  # never later than the edit allows
        cost = overhead * len(set(starts)) + sum(length - 1 - s for s in starts)
        assert cost == _brute_force_grouping_cost([max(t - 1, 0) for t in first_edited], length, overhead)
    assert shared_starts([5, 9, 9], 10, overhead=0) == [4, 8, 8]
    assert shared_starts([5, 9, 9], 10, overhead=1000) == [4, 4, 4]


def test_a_stalled_request_draws_fresh_samples_that_replace_its_worst_chains(lm, engine, make_prompt):
    """With no edit to try, the chains stall; with ``restart_after`` a stalled step draws base samples instead, and
    a sample that beats the worst chain takes its place: energies only fall and stay exact."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    prompt = make_prompt("what is a boat")
    config = {"max_tokens": 6, "chains": 2, "steps": 6, "seed": 5, "init_samples": 2, "candidates": 1, "max_estimate": -1e9}
    stalled = engine.run([_job(prompt, reward, **config, restart_after=None)])[0]
    restarted = engine.run([_job(prompt, reward, **config, restart_after=1)])[0]
    assert [c.energy for c in stalled.chains] == [c.initial.energy for c in stalled.chains]  # nothing to try: no move
    assert sum(c.energy for c in restarted.chains) < sum(c.energy for c in stalled.chains) - 1e-6
    assert restarted.usage.compute > stalled.usage.compute  # the samples are counted
    for chain in restarted.chains:  # no edit moved a chain, so each returns the sample it (re)started from
        assert chain.energy == pytest.approx(chain.initial.energy, abs=1e-6)
        assert all(step.changed == 0 for step in chain.trace)
    _assert_energies_only_fall_and_are_exact(lm, engine, prompt, reward, restarted, length=6)


def test_a_step_recomputes_gradients_only_for_the_chains_that_moved(lm, engine, make_prompt):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    state = engine.start(_job(make_prompt("what is a boat"), reward, max_tokens=8, chains=4, steps=8, seed=7, restart_after=None))
    passes = scoring_passes(8, [PrincipleReward(lm)])
    moved_last = list(range(4))  # the first step needs every chain's gradient
    partial = False
    while not state.done:
        before, tokens = state.usage.backward_token_passes, state.tokens.clone()
        engine.tick([state])
        assert state.usage.backward_token_passes - before == passes * len(moved_last)
        moved_last = [c for c in range(4) if not torch.equal(tokens[c], state.tokens[c])]
        partial = partial or 0 < len(moved_last) < 4
    assert partial  # some step moved some chains and not others
    _assert_energies_only_fall_and_are_exact(lm, engine, make_prompt("what is a boat"), reward, engine.result(state), length=8)


def test_chains_that_stopped_improving_are_parked_while_others_still_improve(lm, engine, make_prompt):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    state = engine.start(_job(make_prompt("what is a boat"), reward, max_tokens=8, chains=4, steps=12, seed=8, restart_after=2))
    parked_while_others_edited = False
    while not state.done:
        parked = [c for c in range(4) if state.stalls[c] >= 2]
        tried = [set(t) for t in state.tried]
        tokens = state.tokens.clone()
        engine.tick([state])
        if parked and len(parked) < 4:  # an editing step: the parked chains are left alone
            parked_while_others_edited = True
            assert all(state.tried[c] == tried[c] and torch.equal(state.tokens[c], tokens[c]) for c in parked)
    assert parked_while_others_edited


@pytest.mark.parametrize("proposals", [("gradient", "gradient"), ("lm", "gradient"), ("gradient", "lm")])
def test_a_request_keeps_editing_when_a_batch_mate_with_another_reward_joins(lm, engine, make_prompt, proposals):
    """Continuous batching: a keyword-only request runs a step alone, then a principle-reward request (which adds a
    second LM scorer) joins its batch, with the same or the other proposal; both finish with exact energies, and
    the second as it does alone."""
    keywords = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["boat"]), 1.0)])
    principle = RewardMix([(PrincipleReward(lm), 1.0)])
    config = {"max_tokens": 6, "chains": 2, "steps": 4, "seed": 9, "restart_after": None}
    first = engine.start(_job(make_prompt("what is a boat"), keywords, **config, proposal=proposals[0]))
    engine.tick([first])
    second = engine.start(_job(make_prompt("sing a song"), principle, **config, proposal=proposals[1]))
    while not (first.done and second.done):
        engine.tick([s for s in (first, second) if not s.done])
    alone = engine.run([_job(make_prompt("sing a song"), principle, **config, proposal=proposals[1])])[0]
    assert engine.result(second).energy == pytest.approx(alone.energy, abs=1e-4)
    assert engine.result(second).usage == alone.usage  # an LM-ranked request beside a gradient one is charged no backward pass
    _assert_energies_only_fall_and_are_exact(lm, engine, make_prompt("sing a song"), principle, engine.result(second), length=6)
    _assert_energies_only_fall_and_are_exact(lm, engine, make_prompt("what is a boat"), keywords, engine.result(first), length=6)


def test_categorical_draws_follow_the_probabilities_and_never_a_zero():
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0]).expand(40_000, 6) * 3.0  # unnormalised rows
    drawn = categorical(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=6).float() / drawn.numel()
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts[[1, 3, 4]], torch.tensor([0.2, 0.5, 0.3]), atol=0.01)
    again = categorical(probs[:100], torch.Generator().manual_seed(0))
    assert torch.equal(again, drawn[:100])  # a seeded generator draws the same
    edge = torch.zeros(3, 4)
    edge[:, 2] = 1.0  # all the mass on one token, zeros on both ends
    assert categorical(edge, torch.Generator().manual_seed(1)).tolist() == [2, 2, 2]


def test_categorical_never_draws_a_zero_where_a_parallel_cumulative_sum_steps_up_over_it(monkeypatch):
    """CUDA's scan sums each prefix in its own order: over a zero-probability entry the sum can rise by a rounding
    error, where a uniform can land. Simulated by a cumulative sum that rises there by a quarter of the mass."""
    probs = torch.tensor([[0.5, 0.0, 0.5]]).expand(2_000, 3)
    cumsum = torch.Tensor.cumsum
    monkeypatch.setattr(torch.Tensor, "cumsum", lambda self, dim: cumsum(self, dim) + torch.tensor([0.0, 0.25, 0.25]))
    drawn = categorical(probs, torch.Generator().manual_seed(0))
    assert 1 not in drawn.tolist() and set(drawn.tolist()) <= {0, 2}


def test_a_request_out_of_budget_in_a_step_that_fails_gets_its_result_when_the_step_is_retried(engine, make_prompt, monkeypatch):
    """It was marked done before the step's scoring ran; when a batch mate's scoring ran out of memory and the worker
    retried each half, it was skipped as done and left without a result (the worker then failed the whole batch)."""
    from app.engine import discrete

    reward = RewardMix([(PrincipleReward(engine.lm), 1.0)])
    states = engine.start_many([_job(make_prompt("the dog"), reward, max_tokens=4, chains=2, steps=3, seed=0, max_compute=1),
                                _job(make_prompt("the cat"), reward, max_tokens=4, chains=2, steps=3, seed=0)])
    real = discrete.evaluate

    def out_of_memory_once(*args, **kwargs):
        monkeypatch.setattr(discrete, "evaluate", real)
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(discrete, "evaluate", out_of_memory_once)
    with pytest.raises(torch.OutOfMemoryError):
        engine.tick(states)
    assert not states[0].done  # not until a step has run
    for state in states:  # the worker's retry: each half again
        engine.tick([state])
    assert states[0].done and states[0].result is not None


def test_a_request_s_scoring_costs_the_same_alone_and_beside_a_longer_request(engine, make_prompt):
    """Its candidate rows were cut into passes sized by the batch's widest response, and each pass grouped its edits'
    start positions apart: the token-passes charged, and under max_compute the answer, depended on the batch mates
    (19 of 120 randomized runs; e.g. seed 22 at max_compute 300 returned another text beside a 12-token request)."""
    reward = RewardMix([(PrincipleReward(engine.lm), 1.0)])
    mate = _job(make_prompt("hi"), reward, max_tokens=12, chains=6, steps=1, seed=1, candidates=64)
    differ = []
    for seed, budget in ((17, 300), (22, 300), (27, 600), (30, 900)):  # seeds that differed, among 40
        config = {"max_tokens": 3, "chains": 2, "steps": 6, "candidates": 64, "seed": seed, "max_compute": budget,
                  "restart_after": None, "proposal": "lm", "init": "random"}
        alone = engine.run([_job(make_prompt("hi"), reward, **config)])[0]
        beside = engine.run([mate, _job(make_prompt("hi"), reward, **config)])[1]
        if (alone.usage, alone.text) != (beside.usage, beside.text):
            differ.append(seed)
    assert differ == []


def test_a_restart_never_replaces_a_chain_with_the_tokens_it_holds(lm, monkeypatch):
    """Float noise (which depends on the batch) put a fresh sample identical to a chain ~2e-6 nats lower: it replaced
    the chain, counted as a move, and the request's later steps and usage depended on its batch mates."""
    from app.engine import discrete, starts
    from app.runtime import Runtime
    from app.settings import Settings

    runtime = Runtime.from_lm(lm, Settings())
    identical = []
    real_take = starts.take

    def take(state, chain, scored, index, step):
        if torch.equal(scored.tokens[index, : state.spec.length], state.tokens[chain]):
            identical.append((chain, step))
        return real_take(state, chain, scored, index, step)

    monkeypatch.setattr(starts, "take", take)  # a restart's
    monkeypatch.setattr(discrete, "take", take)  # an accepted edit's
    prompt = ("is moon yes five with dog violin was park and morning safe violin is to fire weekend telescope penguin green good "
              "can help green the write violin help fish light walk play telescope i light . knife bad we will happy fish write "
              "it one in walk sorry ? why")
    target = lambda: runtime.job([{"role": "user", "content": prompt}], SEAConfig(
        chains=1, steps=6, max_tokens=12, temperature=1e-4, top_p=0.1, init="sample", proposal="lm", seed=1806101408885074),
        keywords=["weekend"])
    mate = runtime.job([{"role": "user", "content": "the dog"}], SEAConfig(chains=3, steps=3, max_tokens=1, seed=0),
                       keywords=["play", "how", "fish"], keywords_only=True)
    alone = runtime.engine.run([target()])[0]
    beside = runtime.engine.run([mate, target()])[1]
    assert identical == []
    assert (alone.usage, [c.best_step for c in alone.chains]) == (beside.usage, [c.best_step for c in beside.chains])


@pytest.mark.parametrize("method", ["sea", "bon", "args", "cbs", "sample"])
def test_token_log_probs_are_the_reference_s_and_sum_to_the_chain_s_log_prob(lm, engine, make_prompt, method):
    """SEAConfig.logprobs (OpenAI's `logprobs`): for the best `logprob_chains` chains only, one entry per counted token,
    each the reference's log-prob of the token with its most likely tokens there, best first."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    result = engine.run([_job(make_prompt("tell me a story"), reward, max_tokens=8, chains=3, steps=3, samples=4, seed=1,
                              method=method, logprobs=3, logprob_chains=2)])[0]
    listed = [c for c in result.chains if c.token_log_probs is not None]
    assert result.chains[result.chosen].token_log_probs is not None and len(listed) == min(2, len(result.chains))
    for chain in listed:
        assert [entry.token for entry in chain.token_log_probs] == chain.tokens[: chain.counted]
        assert sum(entry.log_prob for entry in chain.token_log_probs) == pytest.approx(chain.log_prob_ref, abs=1e-4)
        for entry in chain.token_log_probs:
            values = [value for _, value in entry.top]
            assert len(values) == 3 and values == sorted(values, reverse=True) and entry.log_prob <= values[0] + 1e-6
    plain = engine.run([_job(make_prompt("tell me a story"), reward, max_tokens=8, chains=3, steps=3, samples=4, seed=1, method=method)])[0]
    assert all(c.token_log_probs is None for c in plain.chains) and plain.text == result.text
    # the pass is the request's cost: each listed chain's tokens fed forward, the last to nothing, padded to the longest
    fed = len(listed) * (max(c.counted for c in listed) - 1)
    assert result.usage.forward_token_passes - plain.usage.forward_token_passes == fed
    assert result.usage.backward_token_passes == plain.usage.backward_token_passes
    # Not inside a step (a failure there would fail its batch mates): the worker attaches them to a finished request
    states = engine.start_many([_job(make_prompt("tell me a story"), reward, max_tokens=8, chains=3, steps=3, samples=4, seed=1,
                                     method=method, logprobs=3, logprob_chains=2)])
    while not states[0].done:
        engine.advance(states[0]) if states[0].baseline is not None else engine.tick(states)
    assert all(c.token_log_probs is None for c in states[0].result.chains)
    engine.attach_token_log_probs(states[0])
    assert [c.token_log_probs for c in states[0].result.chains] == [c.token_log_probs for c in result.chains]


def test_the_token_log_prob_pass_charges_what_it_feeds_padding_too(lm, make_prompt, monkeypatch):
    """Listed chains of different lengths run padded to the longest of their pass: the usage counts those positions
    (it counted each chain's own tokens only), and each pass is only as wide as its own longest chain."""
    engine = sea.Engine(lm)
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    job = _job(make_prompt("tell me a story"), reward, max_tokens=8, method="bon", samples=5, seed=2, logprobs=2, logprob_chains=5)
    states = engine.start_many([job])
    while not states[0].done:
        engine.advance(states[0])
    lengths = [8, 3, 2, 8, 5]
    for chain, counted in zip(states[0].result.chains, lengths):
        chain.counted = counted
    chosen = sea.ranked_chains(states[0].result.chains, states[0].result.chosen, 5, job.config.select)
    monkeypatch.setattr(sea, "rows_per_pass", lambda width, prompt, response: 2)
    widths = []
    real = sea.log_probs_with_top
    monkeypatch.setattr(sea, "log_probs_with_top", lambda *args: widths.append(args[2].shape[1]) or real(*args))
    before = states[0].usage.forward_token_passes
    engine.attach_token_log_probs(states[0])
    passes = [[lengths[i] for i in chosen[first : first + 2]] for first in range(0, 5, 2)]
    assert widths == [max(p) for p in passes]
    assert states[0].usage.forward_token_passes - before == sum(len(p) * (max(p) - 1) for p in passes)
    assert [len(c.token_log_probs) for c in states[0].result.chains] == lengths


def test_token_log_probs_of_many_samples_run_in_bounded_passes(lm, engine, make_prompt, monkeypatch):
    """A Best-of-256 asking for every sample's log-probs ran them in one pass, past the rows × tokens a draw or a
    scoring pass may hold: it is cut like them, with the same figures."""
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    job = _job(make_prompt("tell me a story"), reward, max_tokens=6, method="bon", samples=12, seed=2, logprobs=2, logprob_chains=12)
    whole = engine.run([job])[0]
    passes = []
    real = sea.log_probs_with_top
    monkeypatch.setattr(sea, "rows_per_pass", lambda width, prompt, response: 5)  # as a small ROW_TOKENS_PER_PASS would
    monkeypatch.setattr(sea, "log_probs_with_top", lambda *args: passes.append(args[2].shape[0]) or real(*args))
    cut = engine.run([job])[0]
    assert len(passes) > 1 and sum(passes) == 12
    for a, b in zip(whole.chains, cut.chains):
        assert [t.token for t in a.token_log_probs] == [t.token for t in b.token_log_probs]
        assert [t.log_prob for t in a.token_log_probs] == pytest.approx([t.log_prob for t in b.token_log_probs], abs=1e-5)
