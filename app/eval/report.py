"""``sea eval``'s summaries and report: paired comparisons with each method's baseline (bootstrap intervals), the
per-method means, the Markdown report, the plots; and ``--from``, which rebuilds them from earlier runs' records."""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
from pathlib import Path

from app.eval.measures import COPY_WORDS, distinct_n
from app.eval.methods import VARIANTS, describe
from models.rewards import keyword_coverage


def report_from(args: argparse.Namespace) -> dict:
    """``--from DIR...``: the results and report of earlier runs' records (shards, seeds), without running anything."""
    records = []
    for folder in args.from_dirs:
        path = Path(folder) / "records.jsonl"
        if not path.is_file():
            raise SystemExit(f"no records at {path}")
        records += read_records(path)
    runs = {json.dumps(r.get("run"), sort_keys=True) for r in records if r.get("run") is not None}
    if len(runs) > 1:
        raise SystemExit("the records were made with different settings, which one report must not mix:\n" + "\n".join(sorted(runs)))
    seconds_budgets = {r["budget"] for r in records if (r.get("run") or {}).get("budget_seconds") is not None}
    if len(seconds_budgets) > 1:
        raise SystemExit("the records' --budget-seconds were converted to different token-pass budgets "
                         f"({', '.join(f'{b:.0f}' for b in sorted(seconds_budgets))}; each run calibrates its own): "
                         "one report must not mix them (resume one output folder with --resume instead)")
    unique = {}
    for record in records:
        unique.setdefault(run_key(record), record)  # the same run in two folders (overlapping shards) counts once
    records = list(unique.values())
    methods = list(dict.fromkeys(r["method"] for r in records))
    run_settings = json.loads(runs.pop()) if runs else {}
    results = summarise_runs(records, methods, args.baseline, {
        **run_settings, "prompts": _prompt_files(args.from_dirs), "methods": methods,
        "seeds": sorted({r["seed"] for r in records})})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_results(results, Path(args.out))
    return results


def _prompt_files(folders: list[str]) -> str:
    """The prompt files the runs in ``folders`` read, as their results say (a folder without them: its records)."""
    named = []
    for folder in folders:
        try:
            named.append(json.loads((Path(folder) / "results.json").read_text())["settings"]["prompts"])
        except (OSError, ValueError, KeyError, TypeError):
            named.append(f"records in {folder}")
    return ", ".join(dict.fromkeys(named))


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prompt_key(row: dict) -> str:
    """A prompt row's identity: its id with its text or messages and keywords (two files may use one id for two
    prompts, which must not be merged by --from or taken for each other by --resume)."""
    return json.dumps([row.get(key) for key in ("id", "prompt", "messages", "keywords")])


def run_key(record: dict) -> tuple:
    """One run: its method, prompt and seed."""
    return record["method"], prompt_key(record), record["seed"]


def paired_comparison(records: list[dict], method: str, baseline: str, resamples: int = 2000, level: float = 0.90) -> dict:
    """``method`` against ``baseline`` on the runs both made (same prompt, same seed), by energy per token.

    The intervals come from a bootstrap that resamples prompts with all their seeds (the seeds of one prompt are
    not independent draws of the method's quality), with a fixed generator, so a report is reproducible. The
    ratio of mean energies is given only when both means are positive (a large reward makes an energy negative).
    """
    by_key = {(prompt_key(r), r["seed"]): r for r in records if r["method"] == baseline}
    matched = [(run[0], r, by_key[run]) for r in records if r["method"] == method and (run := (prompt_key(r), r["seed"])) in by_key]
    side_by_side = {}  # the other figures over the same runs
    for key in ("reward", "log_prob_per_token"):
        values = [(r[key], other[key]) for _, r, other in matched if _finite(r.get(key)) and _finite(other.get(key))]
        side_by_side[key] = statistics.fmean(a for a, _ in values) if values else None
        side_by_side[f"baseline_{key}"] = statistics.fmean(b for _, b in values) if values else None
    pairs: dict[str, list[tuple[int, float, float]]] = {}  # prompt -> (seed, method's, baseline's energy per token)
    for prompt, r, other in matched:
        if math.isfinite(r["energy_per_token"]) and math.isfinite(other["energy_per_token"]):
            pairs.setdefault(prompt, []).append((r["seed"], r["energy_per_token"], other["energy_per_token"]))
    flat = [pair for prompt_pairs in pairs.values() for pair in prompt_pairs]
    if not flat:
        return {"pairs": 0}

    def means(chosen) -> tuple[float, float]:
        return statistics.fmean(a for _, a, _ in chosen), statistics.fmean(b for _, _, b in chosen)

    mine, theirs = means(flat)
    generator = random.Random(0)
    groups = list(pairs.values())
    draws = [means([pair for group in generator.choices(groups, k=len(groups)) for pair in group]) for _ in range(resamples)]
    tail = (1 - level) / 2

    def interval(values: list[float]) -> list[float]:
        ordered = sorted(values)
        return [ordered[round(tail * (len(ordered) - 1))], ordered[round((1 - tail) * (len(ordered) - 1))]]

    by_seed = {}
    for seed in sorted({seed for seed, _, _ in flat}):
        a, b = means([pair for pair in flat if pair[0] == seed])
        by_seed[seed] = {"pairs": sum(pair[0] == seed for pair in flat), "difference": a - b, "ratio": a / b if a > 0 and b > 0 else None}
    positive = mine > 0 and theirs > 0 and all(a > 0 and b > 0 for a, b in draws)
    return {
        **side_by_side, "pairs": len(flat), "prompts": len(groups), "energy_per_token": mine, "baseline_energy_per_token": theirs,
        "difference": mine - theirs, "difference_interval": interval([a - b for a, b in draws]),
        "ratio": mine / theirs if positive else None, "ratio_interval": interval([a / b for a, b in draws]) if positive else None,
        "lower": sum(a < b for _, a, b in flat), "higher": sum(a > b for _, a, b in flat), "level": level, "by_seed": by_seed,
    }


def _finite(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value)


def _baseline_of(name: str, methods: list[str], default: str | None) -> str | None:
    """The Best-of-N a method is paired with when no --baseline is given: the one that picks its answer the same way
    (by reward or by energy) when it ran, else ``default``. Picking by energy lowers the energy a method is measured by:
    SEA by reward against Best-of-N by energy, or the reverse, would compare the picks as much as the methods."""
    if name not in VARIANTS or VARIANTS[name]["method"] != "sea":
        return default
    same = "bon-energy" if VARIANTS[name].get("select") == "energy" else "bon"
    return same if same in methods else default


def summarise_runs(records: list[dict], methods: list[str], baseline: str | None, settings: dict) -> dict:
    """Per-method summaries and each method paired with its baseline (same prompt, same seed): ``baseline`` for every
    method, or without it, for SEA the Best-of-N that picks the same way and for the others Best-of-N by energy (by
    reward when that alone ran)."""
    if baseline is not None and baseline not in methods:
        raise SystemExit(f"--baseline {baseline} was not run (methods: {', '.join(methods)})")
    default = baseline or next((name for name in ("bon-energy", "bon") if name in methods), None)
    baselines = {name: baseline or _baseline_of(name, methods, default) for name in methods}
    for record in records:  # the current measures, also for records written by an older version
        alpha = (record.get("run") or {}).get("alpha")
        if "own_energy" not in record and alpha is not None:
            record["own_energy"] = record["energy"]
            record["energy"] = -(record["log_prob_ref"] + alpha * record["reward"])
            record["energy_per_token"] = record["energy"] / max(1, record.get("completion_tokens") or 1)
        if record.get("keywords"):
            record["coverage"] = keyword_coverage(record["text"], record["keywords"])
            record["all_covered"] = record["coverage"] == 1.0
    summary = {name: _summarise([r for r in records if r["method"] == name]) for name in methods}
    paired = {name: {**paired_comparison(records, name, baselines[name]), "baseline": baselines[name]}
              for name in methods if baselines[name] and baselines[name] != name}
    return {"summary": summary, "paired": paired, "baseline": default, "records": records, "settings": settings}


def write_results(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report(results))
    _plots(results, out)


def _mean_sd(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def _summarise(records: list[dict]) -> dict:
    summary = {key: _mean_sd([r[key] for r in records]) for key in
               ("reward", "energy", "energy_per_token", "log_prob_per_token", "seconds", "compute")}
    texts = [r["text"] for r in records]
    summary.update({"n": len(records), "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
                    "refusal_rate": statistics.fmean(r["refused"] for r in records) if records else None,
                    "principle_copy_rate": statistics.fmean(r.get("copies_principle", False) for r in records) if records else None})
    keyword_rows = [r for r in records if "coverage" in r]
    if keyword_rows:
        summary["coverage"] = statistics.fmean(r["coverage"] for r in keyword_rows)
        summary["all_covered"] = statistics.fmean(r["all_covered"] for r in keyword_rows)
    return summary


def report(results: dict) -> str:
    """A Markdown table of the per-method summary, what each method is, each method paired with its baseline, and
    some of their answers."""
    settings = results["settings"]
    keyword = any("coverage" in s for s in results["summary"].values())
    head = ["method", "n", "reward", "energy/token", "log pi_ref/token", "refusal", "copies principle"]
    head += ["coverage", "all covered"] if keyword else []
    head += ["distinct-2", "compute (token-passes, with the prompt's)", "seconds"]
    budget = (f"{settings['budget_samples']:g} samples" if settings.get("budget_samples")
              else f"{settings['budget_token_passes']} token-passes" if settings.get("budget_token_passes")
              else f"{settings['budget_seconds']} s" if settings.get("budget_seconds") else "none")
    title = (f"Model {settings.get('model', '?')}, prompts `{settings.get('prompts')}`, L = {settings.get('max_tokens', '?')}, "
             f"alpha = {settings.get('alpha', '?')}, seeds {settings.get('seeds')}, budget: {budget}")
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(stat, digits=2):
        return "–" if stat is None or stat.get("mean") is None else f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"

    for name, s in results["summary"].items():
        cells = [name, str(s["n"]), fmt(s["reward"]), fmt(s["energy_per_token"]), fmt(s["log_prob_per_token"]), f"{s['refusal_rate']:.2f}",
                 f"{s['principle_copy_rate']:.2f}"]
        if keyword:
            cells += [f"{s['coverage']:.2f}", f"{s['all_covered']:.2f}"] if "coverage" in s else ["–", "–"]
        cells += [f"{s['distinct_2']:.2f}", f"{s['compute']['mean']:.0f}", f"{s['seconds']['mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ("Energy = −(log pi_ref + alpha · reward), per token of the answer: lower is better (SEA samples for low energy). "
              "reward: the reward term alone, higher is better; log pi_ref/token: how likely the reference model finds the "
              "answer, higher reads more fluently. refusal: the share of answers that open with a refusal or an apology; "
              f"copies principle: the share that repeat {COPY_WORDS} words in a row of the principle prompt (a way to a high "
              "principle reward that says nothing); "
              + ("coverage: the share of a prompt's keywords its answer uses, all covered: the share that use all of them; "
                 if keyword else "")
              + "distinct-2: distinct word pairs over all word pairs of the method's answers (low: the answers repeat "
              "themselves or each other). ± is the standard deviation over the n runs (prompts × seeds).")]
    lines += ["", *(f"- **{name}**: {describe(name)}{_steps_taken(results, name)}" for name in results["summary"])]
    paired = {name: pair for name, pair in results.get("paired", {}).items() if pair["pairs"]}
    if paired:
        level = round(100 * next(iter(paired.values()))["level"])
        several_seeds = len({seed for pair in paired.values() for seed in pair["by_seed"]}) > 1
        columns = ["method", "paired with", "pairs", "energy/token", "theirs", "difference", "ratio", "lower / higher",
                   "reward, theirs", "log pi_ref/token, theirs", *(["by seed"] if several_seeds else [])]
        lines += ["", (f"Each method paired with its baseline's run on the same prompt and seed (without --baseline, SEA's is the "
                  f"Best-of-N that picks its answer the same way, by reward or by energy, when that ran); figures over the "
                  f"paired runs, {level} % intervals from a bootstrap over prompts:"), "",
                  "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for name, pair in paired.items():
            low, high = pair["difference_interval"]
            ratio = "–" if pair["ratio"] is None else f"{pair['ratio']:.2f}× [{pair['ratio_interval'][0]:.2f}, {pair['ratio_interval'][1]:.2f}]"
            cells = [name, pair["baseline"], str(pair["pairs"]), f"{pair['energy_per_token']:.3f}", f"{pair['baseline_energy_per_token']:.3f}",
                     f"{pair['difference']:+.3f} [{low:+.3f}, {high:+.3f}]", ratio, f"{pair['lower']} / {pair['higher']}",
                     _versus(pair, "reward"), _versus(pair, "log_prob_per_token")]
            if several_seeds:
                cells.append(", ".join(f"{seed}: " + (f"{one['difference']:+.3f}" if one["ratio"] is None else f"{one['ratio']:.2f}×")
                                       for seed, one in pair["by_seed"].items()))
            lines.append("| " + " | ".join(cells) + " |")
        lines += _examples(results, paired)
    warnings = budget_warnings(results.get("records", []))
    if budget == "none":
        warnings.insert(0, "no budget (--no-budget): each method ran at its own settings; compare their compute column")
    if warnings:
        lines += ["", "**Not at equal compute:**", "", *[f"- {w}" for w in warnings]]
    return "\n".join(lines) + "\n"


def _steps_taken(results: dict, name: str) -> str:
    """For SEA: its steps, and in how many runs the returned answer is one of its start's samples as drawn (neither an
    edit nor a restart's fresh sample came after it)."""
    runs = [r for r in results.get("records", []) if r["method"] == name and r.get("trace") is not None and "best_step" in r]
    if not runs:
        return ""
    steps = statistics.fmean(r.get("steps") or 0 for r in runs)
    drawn = sum(r["best_step"] == 0 for r in runs)
    return (f" ({steps:.1f} steps a run; the answer returned is one of the start's samples as drawn in {drawn} of "
            f"{len(runs)} runs, an edited chain or a restart's sample in the rest)")


def _versus(pair: dict, key: str) -> str:
    """A figure of the paired runs, the method's and its baseline's."""
    mine, theirs = pair.get(key), pair.get(f"baseline_{key}")
    return "–" if mine is None or theirs is None else f"{mine:.2f}, {theirs:.2f}"


def _examples(results: dict, paired: dict, prompts: int = 3, characters: int = 160) -> list[str]:
    """The answers of each paired method and of its baseline on the first prompts (first seed)."""
    records = results.get("records", [])
    if not records:
        return []
    seed = min(r["seed"] for r in records)
    by_run = {(r["method"], prompt_key(r)): r for r in records if r["seed"] == seed}
    keys = list(dict.fromkeys(prompt_key(r) for r in records if r["seed"] == seed))[:prompts]

    def quoted(record: dict | None) -> str:
        if record is None:
            return "–"
        text = " ".join(record["text"].split())
        return f"“{_plain(text[:characters])}{'…' if len(text) > characters else ''}” (energy/token {record['energy_per_token']:.2f})"

    lines = ["", f"Answers to the first {len(keys)} prompts (seed {seed}):"]
    for key in keys:
        first = next(r for r in records if prompt_key(r) == key)
        asked = first.get("prompt") or " / ".join(str(m.get("content")) for m in first.get("messages") or [])
        lines += ["", f"Prompt: {_plain(' '.join(str(asked).split())[:characters])}", ""]
        for name in dict.fromkeys([*paired, *(pair["baseline"] for pair in paired.values())]):
            lines.append(f"- {name}: {quoted(by_run.get((name, key)))}")
    return lines


def _plain(text: str) -> str:
    """``text`` with the characters Markdown would read as formatting escaped."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


OVERSPEND = 1.05  # compute past the budget by more than this factor is reported


def _spent(record: dict) -> float:
    """A run's compute charged to its budget: the response's work (the prompt's encoding is every method's alike)."""
    return record["compute"] - record.get("prompt_compute", 0)


def budget_warnings(records: list[dict]) -> list[str]:
    """Where a run did not spend the compute it was given: a method whose smallest run (one sample, one beam) costs
    more than the budget, and SEA runs whose budget bought their initial samples but not one step."""
    warnings = []
    for name in dict.fromkeys(r["method"] for r in records):
        runs = [r for r in records if r["method"] == name and r.get("budget")]
        over = [r for r in runs if _spent(r) > OVERSPEND * r["budget"]]
        if over:
            warnings.append(f"{name} spent more than its budget on {len(over)} of {len(runs)} runs (mean "
                            f"{statistics.fmean(_spent(r) for r in over):.0f} against {statistics.fmean(r['budget'] for r in over):.0f} "
                            f"token-passes besides the prompt): the budget is below the method's smallest run")
        stepless = [r for r in runs if r.get("trace") is not None and not r.get("steps")]
        if stepless:
            warnings.append(f"{name} took no step on {len(stepless)} of {len(runs)} runs: the budget bought only its initial "
                            f"samples, so it was Best-of-N by another name there; give a larger budget")
    return warnings


def _plots(results: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'sea-serve[eval]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in results["summary"].items():
        if s["compute"]["mean"] is not None and s["reward"]["mean"] is not None:
            ax.errorbar(s["compute"]["mean"], s["reward"]["mean"], yerr=s["reward"]["sd"], fmt="o", capsize=3, label=name)
    ax.set_xlabel("compute per prompt (token-passes)")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_vs_compute.png", dpi=110)
    plt.close(fig)
    sea = [r for r in results["records"] if r.get("trace")]
    if not sea:
        return
    longest = max(len(chain) for r in sea for chain in r["trace"])
    if longest == 0:  # no run took a step (report.md says so)
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in sorted({r["method"] for r in sea}):
        for ax, key, label in ((axes[0], "trace", "energy"), (axes[1], "trace_reward", "reward")):
            # A run that stopped early keeps its last value, so the mean is over the same prompts at every step.
            curves = [[statistics.fmean(chain[min(i, len(chain) - 1)] for chain in r[key]) for i in range(longest)]
                      for r in sea if r["method"] == name and r[key] and min(map(len, r[key]))]
            if not curves:
                continue
            mean = [statistics.fmean(c[i] for c in curves) for i in range(longest)]
            ax.plot(range(1, longest + 1), mean, label=name)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(f"mean {label} (chains, prompts)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sea_steps.png", dpi=110)
    plt.close(fig)
