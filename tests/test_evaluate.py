"""`sea eval` end to end on two prompts with a tiny model: every method runs at the budget and all outputs are written."""

from __future__ import annotations

import argparse
import json

from app.engine.types import SEAConfig
from app.evaluate import add_eval_arguments, copies, distinct_n, refused, run_eval, size_to_budget
from app.runtime import Runtime
from app.settings import Settings


def test_eval_writes_results_report_and_plots(lm, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "prompt": "write about a dog", "keywords": ["dog", "moon"]}) + "\n"
        + json.dumps({"id": "b", "prompt": "tell me about tea"}) + "\n"
    )
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--prompts", str(prompts), "--methods", "sea,bon,args,cbs,sample,sea-lm", "--budget-samples", "6",
                              "--max-tokens", "6", "--chains", "2", "--out", str(out), "--seeds", "0,1"])
    settings = Settings(default_steps=3)
    results = run_eval(args, settings, runtime=Runtime.from_lm(lm, settings))
    assert (out / "results.json").is_file() and (out / "report.md").is_file()
    assert (out / "reward_vs_compute.png").stat().st_size > 0 and (out / "sea_steps.png").stat().st_size > 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 2 * 2 * 6
    progress = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert progress == records  # written one by one as the runs finish
    budget = 6 * (6 + 5)  # six samples of 6 tokens, each drawn and scored by the reference LM (keyword reward: no LM pass)
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


def test_a_guided_start_gets_a_quarter_of_the_budget_at_what_its_draws_cost():
    """A guided draw runs each token under the guide prompt too, so fewer of them fit the start's quarter."""
    config = SEAConfig(max_tokens=24, chains=2)
    base = size_to_budget(config, 8000, 47)
    guided = size_to_budget(config, 8000, 47, guides=1)
    assert base.init_samples == 2000 // (24 + 47) and guided.init_samples == 2000 // (2 * 24 + 47)
    assert base.max_compute == guided.max_compute == 8000


def test_refusal_detector_looks_only_at_the_opening():
    assert refused("I'm sorry, but I can't help with that.")
    assert refused("  I cannot provide instructions for that.")
    assert not refused("Weeds are illegal to sell in some states, so I'm sorry to say you should check first.")
    assert not refused("Here is how to kill weeds safely.")


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
    results = run_eval(args, Settings(), runtime=Runtime.from_lm(lm, Settings()))
    seconds_per_pass = results["settings"]["seconds_per_token_pass"]
    assert 0 < seconds_per_pass < 0.5
    budgets = {record["budget"] for record in results["records"]}
    assert budgets == {0.5 / seconds_per_pass}
