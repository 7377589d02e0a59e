"""`sea eval` end to end on two prompts with a tiny model: every method runs at the budget and all outputs are written."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import statistics

import pytest

from app.engine.energy import passes_per_row, scoring_passes
from app.engine.types import AlignJob, SEAConfig
from app.eval.measures import copies, distinct_n, refused
from app.eval.methods import describe
from app.eval.report import budget_warnings, paired_comparison, read_records, report, report_from, summarise_runs
from app.eval.run import ARGS_MAX_TOP_K, add_eval_arguments, base_sample_cost, run_eval, size_to_budget
from app.runtime import Runtime
from app.settings import Settings
from models.rewards import LexiconReward, PrincipleReward, RewardComponent, RewardMix


def test_eval_writes_results_report_and_plots(lm, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "prompt": "write about a dog", "keywords": ["dog", "moon"]}) + "\n"
        + json.dumps({"id": "b", "prompt": "tell me about tea"}) + "\n"
    )
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--prompts", str(prompts), "--methods", "sea,bon,args,cbs,sample,sea-lm", "--budget-samples", "8",
                              "--max-tokens", "6", "--chains", "2", "--out", str(out), "--seeds", "0,1"])
    settings = Settings(default_steps=3)
    results = run_eval(args, settings, runtime=Runtime.from_lm(lm, settings))
    assert (out / "results.json").is_file() and (out / "report.md").is_file()
    assert (out / "reward_vs_compute.png").stat().st_size > 0 and (out / "sea_steps.png").stat().st_size > 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 2 * 2 * 6
    progress = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert progress == records  # written one by one as the runs finish
    assert all(record["run"]["keyword_weight"] == settings.default_keyword_weight for record in records)  # the prompts have keywords
    budget = 8 * (6 + 5)  # eight samples of 6 tokens, drawn and scored by the reference LM, and the prompt (a loose bound)
    for record in records:
        assert {"method", "prompt", "text", "reward", "energy", "energy_per_token", "log_prob_ref", "refused", "copies_principle",
                "seconds"} <= set(record)
        if record["method"] in ("bon", "sea", "sea-lm", "cbs") and record["id"] == "a":
            assert record["compute"] <= budget * 1.5, record
        if record["id"] == "a":
            assert 0.0 <= record["coverage"] <= 1.0 and record["all_covered"] == (record["coverage"] == 1.0)
    assert [r["id"] for r in records if r["method"] == "sample"] == ["a", "a", "b", "b"]
    assert set(results["summary"]) == {"sea", "bon", "args", "cbs", "sample", "sea-lm"}
    assert "| sea |" in (out / "report.md").read_text()
    assert "Not at equal compute" not in (out / "report.md").read_text()  # every method spent its budget, SEA took steps


# Reward components as size_to_budget sees them: the principle scores next-token log-probs under its own prompt
# (it feeds the first L − 1 tokens, as the reference does); a reward model reads all L; a word list runs no LM.
def _scorer(**capabilities) -> RewardComponent:
    """A reward component with only the figures compute accounting reads."""
    component = RewardComponent()
    vars(component).update(capabilities)
    return component


PRINCIPLE = _scorer(lm_passes=1, next_token=True, resumes=True)
REWARD_MODEL = _scorer(lm_passes=1)
WORD_LIST = _scorer(lm_passes=0)


def test_a_guided_start_gets_a_quarter_of_the_budget_at_what_its_draws_cost():
    """A draw gives its tokens' reference log-probs, and a guided draw (each token run under the guide prompt too)
    their guide log-probs: scoring a drawn sample costs only what the draw did not compute."""
    config = SEAConfig(max_tokens=24, chains=2)
    base = size_to_budget(config, 8000, [PRINCIPLE])
    guided = size_to_budget(config, 8000, [PRINCIPLE], guides=1)
    assert base.init_samples == 2000 // (23 + 23) and guided.init_samples == 2000 // (2 * 23)
    assert base.max_compute == guided.max_compute == 8000
    with_rm = size_to_budget(config, 8000, [PRINCIPLE, REWARD_MODEL], guides=1)  # a reward model's pass is left to score
    assert with_rm.init_samples == 2000 // (2 * 23 + 24)
    # a budget that would not buy one chain's step after a quarter of it goes to samples whole (it used to be left unspent)
    tiny = size_to_budget(config, 4 * 46, [PRINCIPLE], guides=1)
    assert tiny.init_samples == 4 * 46 // (2 * 23)
    # a sample costs what its draw feeds back (23 tokens: the first comes from the prompt's pass) and the principle's
    # 23 (its first log-prob comes from its own prompt's pass)
    assert size_to_budget(dataclasses.replace(config, method="bon", select="energy"), 8000, [PRINCIPLE]).samples == 8000 // (23 + 23)
    assert size_to_budget(dataclasses.replace(config, method="bon"), 8000, [REWARD_MODEL]).samples == 8000 // (23 + 24)


@pytest.mark.parametrize("reward_name", ["keywords", "principle"])
def test_beam_search_sized_to_a_budget_spends_most_of_it_and_no_more(lm, engine, make_prompt, reward_name):
    """CBS's successors share their beam's tokens: its sizing counts each beam's pass once per chunk (it counted
    it once per successor, about 1.6x what the search runs at 24 tokens, so beam search got fewer successors), a
    successor's chunk at what its draw feeds back, and no rescoring of the answers (they were scored in the search)."""
    reward = {"keywords": RewardMix([(LexiconReward.keywords(lm.tokenizer, ["dog"]), 1.0)]),
              "principle": RewardMix([(PrincipleReward(lm), 1.0)])}[reward_name]
    prompt = make_prompt("write about a dog")
    row = engine.start(AlignJob(prompt, SEAConfig(method="bon", samples=1, max_tokens=24), reward)).spec
    budget = 32 * base_sample_cost(24, passes_per_row(row))
    config = size_to_budget(SEAConfig(method="cbs", max_tokens=24, seed=0, temperature=0.7), budget, [c for c, _ in reward.terms])
    def spent(config):
        usage = engine.run([AlignJob(prompt, config, reward)])[0].usage
        return usage.compute - usage.prompt_token_passes

    # the most successors the budget buys: one more would spend past it
    assert spent(config) <= budget < spent(dataclasses.replace(config, successors=config.successors + 1)), (config.successors, budget)


def test_refusal_detector_looks_only_at_the_opening():
    assert refused("I'm sorry, but I can't help with that.")
    assert refused("  I cannot provide instructions for that.")
    assert not refused("Weeds are illegal to sell in some states, so I'm sorry to say you should check first.")
    assert not refused("Here is how to kill weeds safely.")
    assert not refused("I can't seem to find a single ball in the park.") and not refused("Sorry to hear that! Try this:")
    assert refused("I can't help with that.") and refused("I can’t assist with this request.")


def test_copying_the_principle_prompt_is_flagged():
    assert copies("You are a helpful, honest and harmless assistant. If a request could cause harm")
    assert copies("sure. REFUSE IT BRIEFLY, say why")
    assert not copies("I can't help with that, but here is a safe alternative.")  # three words of it, not four
    assert not copies("Here is a helpful and honest answer.")


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b", "c d"], 2) == 1.0


def test_budget_in_seconds_is_one_token_pass_budget_for_every_method(lm, tmp_path):
    """Wall time is converted once (a timed Best-of-16 after a warm-up) into token-passes shared by every method."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "write about a dog"}) + "\n")
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--prompts", str(prompts), "--methods", "sea,bon,sample", "--budget-seconds", "0.5",
                              "--max-tokens", "4", "--chains", "2", "--out", str(tmp_path / "out")])
    runtime = Runtime.from_lm(lm, Settings())
    results = run_eval(args, Settings(), runtime=runtime)
    seconds_per_pass = results["settings"]["seconds_per_token_pass"]
    assert 0 < seconds_per_pass < 0.5
    budgets = {record["budget"] for record in results["records"]}
    assert budgets == {0.5 / seconds_per_pass}

    # Resumed, the missing runs get the same token-pass budget (a new calibration would give another one)
    records = tmp_path / "out" / "records.jsonl"
    records.write_text(records.read_text().splitlines()[0] + "\n")
    args.resume = True
    resumed = run_eval(args, Settings(), runtime=runtime)
    assert {record["budget"] for record in resumed["records"]} == budgets
    # and a report of two folders converted at different rates is refused
    other = _eval_args("--prompts", str(prompts), "--methods", "sample", "--budget-seconds", "0.5", "--max-tokens", "4",
                       "--chains", "2", "--out", str(tmp_path / "other"))
    run_eval(other, Settings(), runtime=runtime)
    with pytest.raises(SystemExit, match="different token-pass budgets"):
        report_from(_eval_args("--from", str(tmp_path / "out"), "--from", str(tmp_path / "other"), "--out", str(tmp_path / "all")))


def _eval_args(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_without_a_budget_flag_every_method_gets_32_samples_of_compute_and_no_budget_is_said_in_the_report(lm, tmp_path):
    """`sea eval --methods sea,bon` without a budget ran each method at its own defaults (4 chains × 20 steps against
    the default N): not the equal-compute comparison the tool is for, and the report did not say so."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "tea", "prompt": "tell me about tea"}) + "\n")
    runtime = Runtime.from_lm(lm, Settings())
    common = ["--prompts", str(prompts), "--methods", "bon,sample", "--max-tokens", "4"]
    equal = run_eval(_eval_args(*common, "--out", str(tmp_path / "equal")), Settings(), runtime=runtime)
    reward = runtime.job([{"role": "user", "content": "tea"}], SEAConfig(max_tokens=4)).reward
    one_sample = base_sample_cost(4, scoring_passes(4, [component for component, _ in reward.terms]))
    assert {record["budget"] for record in equal["records"]} == {32 * one_sample}
    assert "budget: 32 samples" in (tmp_path / "equal" / "report.md").read_text()
    assert "Not at equal compute" not in (tmp_path / "equal" / "report.md").read_text()
    own = run_eval(_eval_args(*common, "--no-budget", "--out", str(tmp_path / "own")), Settings(), runtime=runtime)
    assert {record["budget"] for record in own["records"]} == {None}
    assert "no budget (--no-budget): each method ran at its own settings" in (tmp_path / "own" / "report.md").read_text()


def test_set_steps_under_a_budget_is_refused_and_no_budget_runs_sea_for_the_default_steps(lm, tmp_path):
    """A budget sizes SEA's steps, so `--set steps=1` was silently ignored (SEA ran to the budget); without a budget
    SEA ran 20 steps whatever SEA_DEFAULT_STEPS said."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "tea", "prompt": "tell me about tea"}) + "\n")
    runtime = Runtime.from_lm(lm, Settings())
    common = ["--prompts", str(prompts), "--methods", "sea", "--max-tokens", "4", "--chains", "2"]
    with pytest.raises(SystemExit, match="--set steps: a budget sizes SEA's run"):
        run_eval(_eval_args(*common, "--set", "steps=1", "--out", str(tmp_path / "a")), Settings(), runtime=runtime)
    as_set = run_eval(_eval_args(*common, "--set", "steps=1", "--no-budget", "--out", str(tmp_path / "b")), Settings(), runtime=runtime)
    by_default = run_eval(_eval_args(*common, "--no-budget", "--out", str(tmp_path / "c")), Settings(default_steps=2), runtime=runtime)
    assert [r["steps"] for r in as_set["records"]] == [1] and [r["steps"] for r in by_default["records"]] == [2]


def test_runs_charged_before_the_accounting_changed_are_not_resumed(lm, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "tea", "prompt": "tell me about tea"}) + "\n")
    out = tmp_path / "out"
    argv = ["--prompts", str(prompts), "--methods", "sample", "--max-tokens", "4", "--out", str(out)]
    runtime = Runtime.from_lm(lm, Settings())
    record = run_eval(_eval_args(*argv), Settings(), runtime=runtime)["records"][0]
    # progress to a log (not a terminal): a line per run, no carriage returns running them together
    progress = capsys.readouterr().err
    assert re.search(r"^\[1/1\] sample +\d+s$", progress, re.MULTILINE) and "\r" not in progress
    del record["run"]["accounting"]  # as written before 4 Dec 2026
    (out / "records.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(SystemExit, match="charged for their compute as before 4 Dec 2026"):
        run_eval(_eval_args(*argv, "--resume"), Settings(), runtime=runtime)


def test_resume_runs_only_what_is_missing_and_refuses_other_settings(lm, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": name, "prompt": f"tell me about {name}"}) + "\n" for name in ("tea", "rain")))
    out = tmp_path / "out"
    argv = ["--prompts", str(prompts), "--methods", "bon-energy,sample", "--budget-samples", "3", "--max-tokens", "4",
            "--out", str(out), "--seeds", "0,1"]
    runtime = Runtime.from_lm(lm, Settings())
    first = run_eval(_eval_args(*argv), Settings(), runtime=runtime)["records"]
    assert "keyword_weight" not in first[0]["run"]  # no keywords in these prompts: the weight changes nothing
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:5]) + "\n")  # stopped after five of the eight runs

    calls = []
    run = runtime.engine.run
    runtime.engine.run = lambda jobs: calls.append(jobs) or run(jobs)
    resumed = run_eval(_eval_args(*argv, "--resume"), Settings(), runtime=runtime)["records"]
    assert len(calls) == 3
    drop_time = lambda record: {k: v for k, v in record.items() if k != "seconds"}
    assert [drop_time(r) for r in resumed] == [drop_time(r) for r in first]  # same order, same (seeded) results
    assert len((out / "records.jsonl").read_text().splitlines()) == 8

    with pytest.raises(SystemExit, match="other settings"):
        run_eval(_eval_args(*argv[:-4], "--alpha", "7", "--out", str(out), "--resume"), Settings(), runtime=runtime)
    assert len(calls) == 3


def test_a_run_without_resume_keeps_the_earlier_records_of_its_folder(lm, tmp_path, capsys):
    """They were emptied without a word when --resume was forgotten."""
    runtime = Runtime.from_lm(lm, Settings())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tell me about tea\n")
    out = tmp_path / "out"
    for seed in ("0", "1", "2"):
        run_eval(_eval_args("--prompts", str(prompts), "--methods", "sample", "--budget-samples", "3", "--max-tokens", "4",
                            "--seeds", seed, "--out", str(out)), Settings(), runtime=runtime)
    kept = [read_records(out / name) for name in ("records.previous.jsonl", "records.previous.2.jsonl", "records.jsonl")]
    assert [[r["seed"] for r in records] for records in kept] == [[0], [1], [2]]  # none overwritten
    assert "kept as records.previous.jsonl" in capsys.readouterr().err


def test_report_from_shards_pairs_each_method_with_the_baseline(lm, tmp_path):
    runtime = Runtime.from_lm(lm, Settings())
    shards = []
    for index, names in enumerate((("tea", "rain"), ("rain", "snow"))):  # overlapping shards: "rain" runs twice
        prompts = tmp_path / f"prompts{index}.jsonl"
        prompts.write_text("".join(json.dumps({"id": name, "prompt": f"tell me about {name}"}) + "\n" for name in names))
        shards.append(str(tmp_path / f"shard{index}"))
        run_eval(_eval_args("--prompts", str(prompts), "--methods", "sample,bon-energy", "--budget-samples", "3",
                            "--max-tokens", "4", "--out", shards[-1]), Settings(), runtime=runtime)
    out = tmp_path / "all"
    results = report_from(_eval_args("--from", shards[0], "--from", shards[1], "--out", str(out)))
    assert results["summary"]["sample"]["n"] == results["summary"]["bon-energy"]["n"] == 3
    assert results["baseline"] == "bon-energy" and results["paired"]["sample"]["pairs"] == 3
    assert "| sample | bon-energy | 3 |" in (out / "report.md").read_text()
    assert results["settings"]["max_tokens"] == 4
    # the report names the prompt files the shards read (it named the records' folders as its prompts)
    assert results["settings"]["prompts"] == f"{tmp_path / 'prompts0.jsonl'}, {tmp_path / 'prompts1.jsonl'}"
    assert "distinct-2: distinct word pairs" in (out / "report.md").read_text()

    other = tmp_path / "other"
    run_eval(_eval_args("--prompts", str(tmp_path / "prompts0.jsonl"), "--methods", "sample", "--budget-samples", "3",
                        "--max-tokens", "5", "--out", str(other)), Settings(), runtime=runtime)
    with pytest.raises(SystemExit, match="different settings"):
        report_from(_eval_args("--from", shards[0], "--from", str(other), "--out", str(out)))


def _record(method, prompt, seed, energy_per_token):
    return {"method": method, "id": prompt, "prompt": prompt, "seed": seed, "energy_per_token": energy_per_token}


def test_paired_comparison_intervals_follow_the_prompts():
    lower = [_record("a", p, s, 1.0 + 0.1 * p) for p in range(8) for s in range(3)]
    base = [_record("b", p, s, 2.0 + 0.1 * p + 0.05 * s) for p in range(8) for s in range(3)]
    pair = paired_comparison(lower + base + [_record("a", 99, 0, 0.5)], "a", "b")  # prompt 99 has no baseline run
    assert pair["pairs"] == 24 and pair["prompts"] == 8 and pair["lower"] == 24 and pair["higher"] == 0
    assert pair["difference_interval"][1] < 0 and pair["ratio_interval"][1] < 1
    assert pair["ratio_interval"][0] <= pair["ratio"] <= pair["ratio_interval"][1]

    same = paired_comparison(base + [{**r, "method": "c"} for r in base], "c", "b")
    assert same["difference"] == 0 and same["difference_interval"] == [0, 0] and same["lower"] == same["higher"] == 0

    negative = paired_comparison([_record("a", 0, 0, -1.0), _record("b", 0, 0, 0.5)], "a", "b")
    assert negative["ratio"] is None and negative["difference"] == -1.5  # no ratio of energies of opposite signs
    assert paired_comparison(base, "a", "b") == {"pairs": 0}
    assert pair["by_seed"][2]["pairs"] == 8 and pair["by_seed"][0]["difference"] == pytest.approx(-1.0)
    assert pair["by_seed"][2]["ratio"] == pytest.approx(statistics.fmean(1.0 + 0.1 * p for p in range(8)) / statistics.fmean(2.1 + 0.1 * p for p in range(8)))


def test_sea_is_paired_with_the_best_of_n_that_picks_the_same_way_and_the_report_says_what_ran(tmp_path):
    """The README's `--methods sea,bon` paired SEA by reward with Best-of-N by reward, and `bon-energy` beside it made
    every method's baseline Best-of-N by energy: SEA by reward against a baseline picked for low energy. The report
    named neither method, nor the way a figure is better, nor how many answers SEA's steps changed (judge review)."""
    def run(method, prompt, energy, reward, best_step=0):
        record = {**_record(method, prompt, 0, energy), "text": f"{method} says {prompt}", "reward": reward, "energy": energy * 10,
                  "log_prob_per_token": -energy, "refused": False, "copies_principle": False, "seconds": 1.0, "compute": 100}
        return {**record, "trace": [[energy]], "steps": 3, "best_step": best_step} if method.startswith("sea") else record

    records = [run(m, p, e + 0.1 * p, r, best_step=p) for p in range(3)
               for m, e, r in (("sea", 1.0, 1.0), ("sea-energy", 0.9, 0.8), ("bon", 2.0, 2.0), ("bon-energy", 1.5, 1.5), ("sample", 3.0, 0.0))]
    methods = ["sea", "sea-energy", "bon", "bon-energy", "sample"]
    results = summarise_runs(records, methods, None, {"budget_samples": 32})
    assert {name: pair["baseline"] for name, pair in results["paired"].items()} == {
        "sea": "bon", "sea-energy": "bon-energy", "bon": "bon-energy", "sample": "bon-energy"}
    assert results["paired"]["sea"]["baseline_energy_per_token"] == pytest.approx(2.1)  # bon's, not bon-energy's
    forced = summarise_runs(records, methods, "bon", {})
    assert {pair["baseline"] for pair in forced["paired"].values()} == {"bon"}  # --baseline still pairs every method with it
    text = report(results)
    assert "lower is better" in text and "the chain with the highest reward returned" in text
    assert "Best-of-N: N samples of the reference model (N as the budget buys), the one with the lowest energy returned" in text
    assert "3.0 steps a run; the answer returned is one of the start's samples as drawn in 1 of 3 runs" in text
    assert "| sea | bon | 3 |" in text and "| 1.00, 2.00 |" in text  # rewards side by side
    # the side-by-side figures are those of the paired runs only (a shard may hold runs its baseline lacks)
    extra = [{**run("sea", 7, 1.0, 50.0), "log_prob_per_token": 9.0}]
    assert summarise_runs(records + extra, methods, None, {})["paired"]["sea"]["reward"] == pytest.approx(1.0)
    assert "random tokens" in describe("sea-random") and "restarted" not in describe("sea-random") and "guided" not in describe("sea-noreward")
    assert "reference model alone" in describe("sea-lm") and "gradient" not in describe("sea-lm").replace("no gradient", "")
    assert "- sea: “sea says 0”" in text and "- bon: “bon says 0”" in text  # their answers
    assert "by seed" not in text  # one seed: the column says nothing


def test_runs_that_did_not_spend_their_budget_are_named_in_the_report():
    def run(method, compute, steps, trace):
        return {"method": method, "budget": 64, "compute": compute, "steps": steps, "trace": trace}

    records = [run("bon", 160, 0, None), run("bon", 60, 0, None), run("sea", 60, 0, [[], []]), run("sea", 64, 3, [[1.0] * 3] * 2),
               run("sample", 20, 0, None)]
    warnings = budget_warnings(records)
    assert len(warnings) == 2
    assert warnings[0].startswith("bon spent more than its budget on 1 of 2 runs") and "160 against 64" in warnings[0]
    assert budget_warnings([{**run("bon", 160, 0, None), "prompt_compute": 100}]) == []  # the prompt's passes are not the budget's
    assert warnings[1].startswith("sea took no step on 1 of 2 runs")
    assert budget_warnings([run("sea", 64, 3, [[1.0] * 3] * 2)]) == []


def test_args_gets_the_most_candidates_its_budget_buys():
    """ARGS scores k candidates per token with the reward: a word list, or the principle read from the decoding's own
    row, scores them for free, so it gets the largest k whatever the budget (it kept the default 10, and the principle
    was charged a pass per candidate); a reward model's passes over each candidate buy fewer."""
    config = SEAConfig(method="args", max_tokens=24)
    assert size_to_budget(config, 32 * 23, [WORD_LIST]).args_top_k == ARGS_MAX_TOP_K
    assert size_to_budget(config, 32 * 46, [PRINCIPLE, WORD_LIST]).args_top_k == ARGS_MAX_TOP_K
    with_model = size_to_budget(config, 88 * 70, [PRINCIPLE, REWARD_MODEL])
    per_k = sum(range(1, 25))  # the reward model reads each candidate's t + 1 tokens
    fixed = 23 * 2 + 24  # the reference and the principle decode 23 tokens fed; the model reads the answer
    assert with_model.args_top_k == (88 * 70 - fixed) // per_k


def test_a_ratio_interval_holds_no_negative_ratio():
    """When some bootstrap draws give the method a negative mean energy, a ratio interval would hold negative ratios
    (meaningless): only the difference is reported."""
    pairs = [(0.9, 1), (0.8, 1), (-1.5, 1), (0.7, 1), (1.2, 1), (-1.3, 1)]
    records = [_record("a", p, 0, a) for p, (a, _) in enumerate(pairs)] + [_record("b", p, 0, b) for p, (_, b) in enumerate(pairs)]
    pair = paired_comparison(records, "a", "b")
    assert pair["energy_per_token"] > 0 and pair["ratio"] is None and pair["ratio_interval"] is None


def test_ablations_report_the_full_energy_keep_their_variant_and_prompts_are_told_apart(lm, tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text(json.dumps({"id": "k01", "prompt": "write about a dog"}) + "\n")
    second.write_text(json.dumps({"id": "k01", "prompt": "tell me about tea"}) + "\n")  # the same id, another prompt
    runtime = Runtime.from_lm(lm, Settings())
    configs = []
    run = runtime.engine.run
    runtime.engine.run = lambda jobs: configs.extend(job.config for job in jobs) or run(jobs)
    common = ["--budget-samples", "12", "--max-tokens", "5", "--chains", "2", "--alpha", "2"]
    results = run_eval(_eval_args("--prompts", str(first), "--methods", "sea-noref,sea-nonoise", *common, "--set", "noise=0.5",
                                  "--set", "chains=3", "--out", str(tmp_path / "a")), Settings(), runtime=runtime)
    noref = results["records"][0]
    assert noref["energy"] == pytest.approx(-(noref["log_prob_ref"] + 2 * noref["reward"]))  # not the -alpha·r it minimised
    assert noref["own_energy"] == pytest.approx(-2 * noref["reward"], abs=1e-4)
    assert [(c.noise, c.chains) for c in configs] == [(0.5, 3), (0.0, 3)]  # --set tunes the variants, but no-noise keeps no noise

    run_eval(_eval_args("--prompts", str(second), "--methods", "sea-noref", *common, "--set", "noise=0.5", "--set", "chains=3",
                        "--out", str(tmp_path / "b")), Settings(), runtime=runtime)
    merged = report_from(_eval_args("--from", str(tmp_path / "a"), "--from", str(tmp_path / "b"), "--out", str(tmp_path / "all")))
    assert merged["summary"]["sea-noref"]["n"] == 2  # two prompts that share an id are two prompts
    assert "| sea-nonoise | 1 |" in (tmp_path / "all" / "report.md").read_text()


@pytest.mark.parametrize("length", [8, 24])
def test_the_paper_literal_update_sized_to_a_budget_spends_no_more(lm, engine, make_prompt, length):
    reward = RewardMix([(PrincipleReward(lm), 1.0)])
    prompt = make_prompt("write about a dog")
    row = engine.start(AlignJob(prompt, SEAConfig(method="bon", samples=1, max_tokens=length), reward)).spec
    budget = 32 * base_sample_cost(length, passes_per_row(row))
    config = size_to_budget(SEAConfig(method="sea", update="logits", init="sample", max_tokens=length, chains=2, seed=0), budget,
                            [c for c, _ in reward.terms])
    usage = engine.run([AlignJob(prompt, config, reward)])[0].usage
    assert 0.8 * budget <= usage.compute - usage.prompt_token_passes <= budget, (config.steps, usage.compute, budget)


def test_prompt_files_are_read_or_refused_with_the_line_that_is_wrong(tmp_path):
    from app.eval.run import read_prompts

    text = tmp_path / "prompts.txt"
    text.write_text("Tell me about tea.\n\nWrite a haiku about rain.\n")
    assert read_prompts(text) == [{"id": "line1", "prompt": "Tell me about tea."}, {"id": "line3", "prompt": "Write a haiku about rain."}]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "hi", "keywords": ["dog"]}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    assert len(read_prompts(rows)) == 2
    for content, message in (("not json\n", ":1: not JSON"), (json.dumps({"text": "hi"}) + "\n", ":1: a row needs a `prompt`"),
                             (json.dumps({"prompt": "hi", "keywords": "dog"}) + "\n", "`keywords` must be a list"), ("\n", "holds no prompts"),
                             # a chat the API would refuse: it ended the run in a traceback, or ran with a role no model knows
                             (json.dumps({"messages": "hi"}) + "\n", ":1: `messages`: Input should be a valid list"),
                             (json.dumps({"messages": [{"role": "user"}]}) + "\n", r":1: `messages`\[0.content\]: Field required"),
                             (json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n", r"`messages`\[0.role\]"),
                             (json.dumps({"messages": [{"role": "user", "content": " "}]}) + "\n", "no message of `messages` holds any text"),
                             # with a prompt beside them, the messages are what runs
                             (json.dumps({"prompt": "hi", "messages": "oops"}) + "\n", ":1: `messages`: Input should be a valid list")):
        rows.write_text(content)
        with pytest.raises(SystemExit, match=message):
            read_prompts(rows)
    text.write_text("\n \n")  # it returned no rows, and the evaluation ended in a traceback
    with pytest.raises(SystemExit, match="holds no prompts"):
        read_prompts(text)
    with pytest.raises(SystemExit, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(("argv", "message"), [(["--methods", "sea,bestofn"], "unknown methods"), (["--seeds", "0,x"], "--seeds"),
                                               (["--set", "stepz=3"], "--set stepz=3"), (["--limit", "0"], "2")])
def test_bad_arguments_stop_the_evaluation_before_the_models_load(tmp_path, argv, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n")

    class Unloadable:
        def __getattr__(self, name):
            raise AssertionError("the models were used before the arguments were checked")

    with pytest.raises(SystemExit, match=message):
        run_eval(_eval_args("--prompts", str(prompts), "--out", str(tmp_path / "out"), *argv), Settings(), runtime=Unloadable())


def test_a_prompt_the_model_s_template_refuses_stops_the_evaluation_before_anything_runs(lm, tmp_path):
    """Row 2's refusal ended the evaluation in a traceback after row 1 had run."""
    strict = copy.deepcopy(lm)
    strict.tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"id": "two", "messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}) + "\n")
    runtime = Runtime.from_lm(strict, Settings())
    with pytest.raises(SystemExit, match=r"prompt 2 \(two\): the model's chat template refuses these messages"):
        run_eval(_eval_args("--prompts", str(prompts), "--out", str(tmp_path / "out"), "--methods", "sample"), Settings(), runtime=runtime)
    assert not (tmp_path / "out" / "records.jsonl").exists()
