"""Baselines on the tiny model: Best-of-N, ARGS and chunk-level beam search against their definitions."""

from __future__ import annotations

import pytest
import torch

from app.engine.sampling import sample_responses
from app.engine.sea import Engine
from app.engine.types import AlignJob, SEAConfig
from models.lm import encode_prefix
from models.rewards import LexiconReward, PrincipleReward, RewardMix
from tests.tiny import positions_run


@pytest.fixture
def reward(lm):
    return RewardMix([(PrincipleReward(lm), 1.0), (LexiconReward.keywords(lm.tokenizer, ["dog", "moon"]), 3.0)])


def run(engine, prompt, reward, **config):
    return engine.run([AlignJob(prompt, SEAConfig(max_tokens=8, seed=5, **config), reward)])[0]


@pytest.mark.parametrize("method", ["sample", "bon", "args", "cbs"])
def test_same_seed_same_result_and_all_fields(engine, make_prompt, reward, method):
    prompt = make_prompt("write about a dog")
    first, again = run(engine, prompt, reward, method=method), run(engine, prompt, reward, method=method)
    assert first.text == again.text and first.energy == again.energy
    assert first.method == method
    assert first.energy == pytest.approx(-(first.log_prob_ref + first.reward), abs=1e-4)
    assert first.usage.forward_token_passes > 0 and first.usage.completion_tokens <= 8
    assert first.timings.total > 0
    assert first.timings.init == first.timings.total and first.timings.langevin == 0  # all drawing and scoring, no steps


def test_best_of_one_is_a_plain_sample(engine, make_prompt, reward):
    prompt = make_prompt("tell me about tea")
    assert run(engine, prompt, reward, method="bon", samples=1).text == run(engine, prompt, reward, method="sample").text


def test_best_of_n_by_reward_and_by_energy(engine, make_prompt, reward):
    prompt = make_prompt("tell me about tea")
    by_reward = run(engine, prompt, reward, method="bon", samples=12)
    assert len(by_reward.chains) == 12
    assert by_reward.reward == max(c.reward for c in by_reward.chains)
    by_energy = run(engine, prompt, reward, method="bon", samples=12, select="energy")
    assert by_energy.energy == min(c.energy for c in by_energy.chains)


def test_args_without_reward_weight_is_greedy_decoding(engine, make_prompt, reward):
    prompt = make_prompt("sing a song")
    args = run(engine, prompt, reward, method="args", alpha=0.0, temperature=0.0)
    greedy = run(engine, prompt, reward, method="sample", temperature=0.0)
    assert args.chains[0].tokens == greedy.chains[0].tokens


def test_args_reward_weight_raises_reward(engine, make_prompt, lm):
    keywords = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["moon", "sun"]), 1.0)])
    prompt = make_prompt("sing a song")
    plain = run(engine, prompt, keywords, method="args", alpha=0.0, temperature=0.0, args_top_k=40)
    steered = run(engine, prompt, keywords, method="args", alpha=30.0, temperature=0.0, args_top_k=40)
    assert steered.reward > plain.reward


def test_chunk_beam_search_with_one_beam_and_one_successor_is_chunked_sampling(engine, make_prompt, reward):
    prompt = make_prompt("what is a boat")
    cbs = run(engine, prompt, reward, method="cbs", beams=1, successors=1, chunk=3)
    sample = run(engine, prompt, reward, method="sample")
    assert cbs.chains[0].tokens == sample.chains[0].tokens


def test_chunk_beam_search_keeps_the_best_beams(engine, make_prompt, reward):
    result = run(engine, make_prompt("what is a boat"), reward, method="cbs", beams=3, successors=4, chunk=4)
    assert len(result.chains) == 3
    assert result.reward == max(c.reward for c in result.chains)


def test_chunk_beam_search_keeps_distinct_beams_and_carries_a_finished_one_once(lm, make_prompt, reward):
    """With stops likely (a third of the vocabulary ends a response), beams finish early: a finished beam carries
    over as it is and draws no successors, so it cannot fill every beam with K copies of itself."""
    engine = Engine(lm)
    engine.use_stop_ids(list(range(0, lm.model.config.vocab_size, 3)))
    for seed in range(6):
        result = engine.run([AlignJob(make_prompt("what is a boat"), SEAConfig(method="cbs", max_tokens=10, chunk=2, beams=3, successors=4,
                                                                               seed=seed, temperature=2.0), reward)])[0]
        beams = [tuple(chain.tokens) for chain in result.chains]
        assert len(set(beams)) == len(beams) == 3, (seed, [chain.text for chain in result.chains])
        assert result.reward == max(chain.reward for chain in result.chains)


def test_successors_sharing_their_beams_pass_draw_what_they_draw_from_copies(lm, make_prompt):
    prefix = encode_prefix(lm.model, make_prompt("what is a boat").ids)
    beams = torch.tensor([[30, 31, 32], [40, 41, 42]])
    stops = Engine(lm).stop_ids

    def draw(**given):
        return sample_responses(lm.model, prefix, 6, 4, stops, torch.Generator().manual_seed(3), **given)

    shared, copies = draw(given=beams, given_repeats=3), draw(given=beams.repeat_interleave(3, dim=0))
    assert torch.equal(shared.tokens, copies.tokens)
    assert torch.allclose(shared.token_log_probs, copies.token_log_probs, atol=1e-5)
    assert copies.forward_token_passes - shared.forward_token_passes == 3 * (6 - 2)  # each beam's 3 tokens run once, not 3 times


@pytest.mark.parametrize("method", ["args", "cbs"])
def test_an_answer_s_scores_are_its_exact_scores_though_the_search_does_not_score_it_again(engine, make_prompt, reward, method):
    """ARGS keeps the reference log-probs of its decoding and beam search the scores of its last chunk: the answers
    they return carry what a full scoring pass gives, without paying for one."""
    from app.engine.energy import evaluate

    result = run(engine, make_prompt("write about a dog"), reward, method=method, beams=2, successors=3, chunk=3)
    spec = engine.start(AlignJob(make_prompt("write about a dog"), SEAConfig(max_tokens=8, seed=5, method=method), reward)).spec
    for chain in result.chains:
        exact = evaluate(engine.lm, [spec.__class__(**{**spec.__dict__, "rows": 1})], engine.stop_ids, torch.tensor([chain.tokens]))
        assert chain.energy == pytest.approx(float(exact.energy[0]), abs=1e-3)
        assert chain.reward == pytest.approx(float(exact.reward[0]), abs=1e-3)
        assert chain.log_prob_ref == pytest.approx(float(exact.log_prob_ref[0]), abs=1e-3)


def test_args_picks_what_scoring_every_candidate_in_full_picks_and_is_charged_what_its_models_run(engine, make_prompt, lm):
    """ARGS scored each of its k candidates by running the principle over all t + 1 tokens, k·L²/2 passes: at equal
    compute it got k = 3 where the paper uses 10. The principle's log-probs now come from one decoding row beside the
    reference's; the picks are those of scoring every candidate in full, and the charge is what the models run."""
    from app.engine.energy import evaluate
    from models.rewards import SequenceClassifierReward
    from tests.tiny import tiny_reward_model

    reward_model = SequenceClassifierReward(tiny_reward_model(lm.model.config.vocab_size), "rm")
    reward = RewardMix([(PrincipleReward(lm), 1.0), (LexiconReward.keywords(lm.tokenizer, ["fire"]), 0.5), (reward_model, 0.3)])
    prompt, length, k, alpha = make_prompt("how do i make a fire"), 6, 5, 2.0
    job = AlignJob(prompt, SEAConfig(method="args", max_tokens=length, alpha=alpha, temperature=0.0, args_top_k=k, seed=0), reward)
    state = engine.start(job)
    with positions_run(lm.model.model, reward_model.backbone) as fed:
        result = engine.run([job])[0]
    assert sum(fed) == result.usage.forward_token_passes  # the prompts' passes included

    tokens: list[int] = []
    for t in range(length):  # ARGS by definition: the reference's top-k, each scored in full
        ids = torch.tensor([prompt.ids + tokens])
        top = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].float(), -1).topk(k)
        candidates = torch.cat([torch.tensor(tokens, dtype=torch.long).expand(k, t), top.indices[:, None]], dim=1)
        partial = state.spec.__class__(**{**state.spec.__dict__, "rows": k, "length": t + 1})
        scores = top.values + alpha * evaluate(engine.lm, [partial], engine.stop_ids, candidates).reward
        tokens.append(int(top.indices[int(scores.argmax())]))
        if tokens[-1] in engine.stop_ids.tolist():
            break
    assert result.chains[0].tokens[: len(tokens)] == tokens

    # Without a reward model, candidates cost nothing: the reference and the principle each feed the answer's tokens.
    principle = RewardMix([(PrincipleReward(lm), 1.0), (LexiconReward.keywords(lm.tokenizer, ["fire"]), 0.5)])
    cheap = engine.run([AlignJob(prompt, SEAConfig(method="args", max_tokens=length, alpha=alpha, temperature=0.0, args_top_k=k,
                                                   seed=0), principle)])[0]
    assert cheap.usage.budgeted == 2 * (cheap.usage.completion_tokens - 1)


def test_beam_search_draws_under_the_principle_s_prompt_too_and_is_charged_what_its_models_run(engine, make_prompt, lm):
    """Each successor was scored by running the principle over its beam's tokens and its chunk again; the draw now runs
    them under the principle's prompt too (a beam's tokens once for its successors), so scoring runs only a reward
    model's passes. The charge is what the models run, and the answers keep their exact scores."""
    from app.engine.energy import evaluate
    from models.rewards import SequenceClassifierReward
    from tests.tiny import tiny_reward_model

    reward_model = SequenceClassifierReward(tiny_reward_model(lm.model.config.vocab_size), "rm")
    prompt = make_prompt("how do i make a fire")
    for terms in ([(PrincipleReward(lm), 1.0)], [(PrincipleReward(lm), 1.0), (reward_model, 0.3)]):
        job = AlignJob(prompt, SEAConfig(method="cbs", max_tokens=9, beams=2, successors=3, chunk=4, seed=1), RewardMix(terms))
        state = engine.start(job)
        with positions_run(lm.model.model, reward_model.backbone) as fed:
            result = engine.run([job])[0]
        assert sum(fed) == result.usage.forward_token_passes
        for chain in result.chains:
            exact = evaluate(engine.lm, [state.spec.__class__(**{**state.spec.__dict__, "rows": 1})], engine.stop_ids, torch.tensor([chain.tokens]))
            assert chain.energy == pytest.approx(float(exact.energy[0]), abs=1e-3)
        if len(terms) == 1:  # chunks of 4, 4 and 1 tokens: drawn under both prompts; beams of 4 and 8 tokens run once each
            assert result.usage.budgeted == 2 * (3 * 3 + 2 * 3 * 3 + 2 * 3 * 0) + 2 * (2 * 4 + 2 * 8)
