"""``sea eval``'s runs: its flags, the prompt file, the equal-compute budget, each method on each prompt and seed
(records written as they finish, so a run resumes), then the summary and report (``report.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from app.api.schemas import ChatMessage
from app.arguments import positive_int
from app.engine.energy import draw_cost, reward_passes, scoring_passes
from app.engine.types import AlignResult, SEAConfig
from app.eval.measures import copies, refused
from app.eval.methods import VARIANTS
from app.eval.report import prompt_key, read_records, report, report_from, run_key, summarise_runs, write_results
from app.settings import Settings
from models.rewards import keyword_coverage

DEFAULT_BUDGET_SAMPLES = 32.0  # the methods are compared at equal compute unless told otherwise (--no-budget)

SIZED_BY_BUDGET = {"steps", "max_compute"}  # SEA fields a budget sets (size_to_budget); --set of them would be ignored

# Bumped when what a run is charged changes, so that --resume and --from never mix runs budgeted differently
# (2: the principle reward charged the L − 1 positions it runs, 4 Dec 2026; 3: ARGS and beam search score candidates
# from the principle's log-probs their decoding computes, not by a pass each, so a budget buys them more).
ACCOUNTING = 3


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", help="JSONL with a `prompt` (or a chat's `messages`) field a line (a `keywords` list makes the "
                                          "reward the fraction of them used; see --keywords-mode), or a .txt file with one prompt a line.")
    parser.add_argument("--methods", default="sea,bon,args,cbs,sample", help=f"Comma-separated, from: {', '.join(VARIANTS)}.")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-samples", type=float, default=None,
                        help=f"Compute of N base samples per prompt and method (without any budget flag: {DEFAULT_BUDGET_SAMPLES:g}).")
    budget.add_argument("--budget-token-passes", type=int, default=None, help="Compute in token-passes per prompt and method.")
    budget.add_argument("--budget-seconds", type=float, default=None, help="Wall time per prompt and method, converted to token-passes.")
    budget.add_argument("--no-budget", action="store_true",
                        help="Run each method at its own settings, not at equal compute: SEA for SEA_DEFAULT_STEPS steps, "
                             "Best-of-N with N = 16, beam search and ARGS at their defaults (--set tunes the SEA variants).")
    parser.add_argument("--out", required=True, help="Output folder: records.jsonl as the runs finish; results.json, report.md and plots at the end.")
    parser.add_argument("--limit", type=positive_int, default=None, help="Only the first N prompts.")
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds; every prompt runs once per seed.")
    parser.add_argument("--max-tokens", type=int, default=None, help="Response length (default: SEA_DEFAULT_MAX_TOKENS).")
    parser.add_argument("--alpha", type=float, default=None, help="Reward weight (default: SEA_DEFAULT_ALPHA).")
    parser.add_argument("--chains", type=int, default=None, help="SEA chains (default: SEA_DEFAULT_CHAINS).")
    parser.add_argument("--keywords-mode", choices=["replace", "add"], default="replace",
                        help="For rows with `keywords`: the keyword reward (weighted SEA_DEFAULT_KEYWORD_WEIGHT) replaces the configured reward, or is added to it.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Extra SEAConfig field for the sea variants, e.g. --set candidates=6 (repeatable); a variant's own "
                             "setting (sea-nonoise's noise, sea-1chain's chains…) is kept.")
    parser.add_argument("--resume", action="store_true",
                        help="Keep the runs already in OUT/records.jsonl (same settings) and run only the missing ones "
                             "(without it, earlier records are moved to OUT/records.previous.jsonl, or .2, .3…).")
    parser.add_argument("--from", dest="from_dirs", action="append", default=[], metavar="DIR",
                        help="Run nothing: report on the records.jsonl of earlier runs (repeatable, e.g. one folder per shard or seed).")
    parser.add_argument("--baseline", default=None,
                        help="Method every other one is paired with, prompt by prompt and seed by seed (default: bon-energy, else bon).")


CHAT = TypeAdapter(list[ChatMessage])


def read_prompts(path: Path) -> list[dict]:
    """The prompt rows of ``path``: JSONL objects with a ``prompt`` (or a chat's ``messages``), or, for a ``.txt``
    file, one prompt a line. A row that is neither stops the evaluation before it runs, naming its line."""
    if not path.is_file():
        raise SystemExit(f"--prompts {path}: no such file")
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    rows = []
    for number, line in lines:
        if path.suffix == ".txt":
            rows.append({"id": f"line{number}", "prompt": line.strip()})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}:{number}: not JSON ({exc.msg}); write one JSON object a line, or one prompt a line in a .txt file") from None
        text = row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(text, str) and text.strip()) and not (isinstance(row, dict) and row.get("messages")):
            raise SystemExit(f"{path}:{number}: a row needs a `prompt` string (or `messages`)")
        if "messages" in row:  # used before the prompt when both are given
            try:  # the API's own message schema: a chat the server would refuse is refused here, before anything runs
                chat = CHAT.validate_python(row["messages"])
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(map(str, error["loc"]))
                raise SystemExit(f"{path}:{number}: `messages`{'[' + where + ']' if where else ''}: {error['msg']} (a list of "
                                 "{role: system, user or assistant, content: text})") from None
            if not any(message.content.strip() for message in chat):
                raise SystemExit(f"{path}:{number}: no message of `messages` holds any text")
        keywords = row.get("keywords")
        if keywords is not None and not (isinstance(keywords, list) and all(isinstance(w, str) for w in keywords)):
            raise SystemExit(f"{path}:{number}: `keywords` must be a list of words")
        rows.append(row)
    if not rows:
        raise SystemExit(f"{path} holds no prompts")
    return rows


def _parse_value(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


ARGS_MAX_TOP_K = 50


def size_to_budget(config: SEAConfig, budget: float | None, scorers: list, guides: int = 0) -> SEAConfig:
    """Size a method to a compute budget (token-passes): N for Best-of-N, steps for SEA, k for ARGS, K for CBS.

    ``scorers``: the reward's components. A draw computes its tokens' reference log-probs, and a guided draw their
    log-probs under each of its ``guides`` prompts (each token fed back runs once per prompt), so scoring a drawn
    sample costs only the rest.
    """
    if budget is None:
        return config
    length = config.max_tokens
    per_row = scoring_passes(length, scorers)
    sample_cost = base_sample_cost(length, per_row)
    if config.method == "bon":
        return dataclasses.replace(config, samples=max(1, int(budget // sample_cost)))
    if config.method == "sea" and config.update == "discrete":
        # each guide is a contrastive component whose log-probs the draw computes
        one_draw = draw_cost(length, guides, max(0, reward_passes(scorers, length) - guides * (length - 1)))
        init = config.init_samples or max(config.chains, int(0.25 * budget // one_draw))
        one_chain_step = 4 * per_row  # its gradient pass (3 passes) and one edit scored
        if not config.init_samples and budget - init * one_draw < one_chain_step:
            init = max(config.chains, int(budget // one_draw))  # no step would fit after a quarter: the budget is all samples
        return dataclasses.replace(config, init_samples=init, max_compute=int(budget), steps=10_000)
    if config.method == "sea":  # the paper-literal update: draw the chains, forward and backward every step, score the last
        left = budget - config.chains * ((length - 1) + per_row)
        steps = max(1, int(left // (3 * config.chains * max(1, per_row))))
        return dataclasses.replace(config, steps=steps)
    if config.method == "args":
        # The reference and each reward of its network (next-token log-probs) decode side by side and score every
        # candidate from that; another LM reward (a reward model) scores each of the k candidates' t + 1 tokens.
        rows, others = _decoding_rows(scorers)
        per_k = sum(reward_passes(others, t + 1) for t in range(length))
        if not per_k:  # candidates are scored for free: the largest k
            return dataclasses.replace(config, args_top_k=ARGS_MAX_TOP_K)
        fixed = (length - 1) * rows + reward_passes(others, length)  # the decoding, and the answer's scoring
        return dataclasses.replace(config, args_top_k=int(min(ARGS_MAX_TOP_K, max(2, (budget - fixed) // per_k))))
    if config.method == "cbs":
        # Each chunk runs every open beam's t tokens once (its successors share them) under the reference and each
        # reward of its network; each successor draws its chunk (its first token from its beam's pass, feeding back
        # the rest but the last) under them too, and is scored by the other rewards' passes over t + chunk tokens.
        # The first chunk grows from one empty beam; the answers keep the scores of their last chunk.
        rows, others = _decoding_rows(scorers)
        chunks = [(t, min(config.chunk, length - t), 1 if t == 0 else config.beams) for t in range(0, length, config.chunk)]
        shared = sum(beams * t * rows for t, _, beams in chunks)
        per_successor = sum(beams * ((size - 1) * rows + reward_passes(others, t + size)) for t, size, beams in chunks)
        return dataclasses.replace(config, successors=max(1, int((budget - shared) // max(1, per_successor))))
    return config


def _decoding_rows(scorers: list) -> tuple[int, list]:
    """ARGS and beam search decode each token under the reference and each reward of its network (next-token
    log-probs): how many rows that is, and the other reward components, which score the tokens with passes of their own."""
    others = [component for component in scorers if not component.next_token]
    return 1 + len(scorers) - len(others), others


def base_sample_cost(length: int, passes_per_row: int) -> int:
    """Token-passes of one base sample, drawn and exactly scored: the draw feeds back every token but the last (the
    first comes from the prompt's pass) and gives their reference log-probs, so scoring it costs only the reward's
    passes. ``--budget-samples N`` is N of these: exactly what Best-of-N spends on its N samples."""
    return draw_cost(length, 0, max(0, passes_per_row - (length - 1)))


def run_eval(args: argparse.Namespace, settings: Settings, runtime=None) -> dict:
    """Run the evaluation and write results.json, report.md and the plots. Returns the results."""
    from app.runtime import Runtime

    methods, seeds, extra = _checked_flags(args)
    rows = read_prompts(Path(args.prompts))
    rows = rows[: args.limit] if args.limit else rows
    runtime = runtime or Runtime.load(settings)
    _refuse_prompts_past_the_model(runtime, rows, args.prompts)
    base = SEAConfig(
        max_tokens=args.max_tokens or settings.default_max_tokens,
        chains=args.chains or settings.default_chains,
        alpha=settings.default_alpha if args.alpha is None else args.alpha,
        steps=settings.default_steps,
    )
    # What a run's result depends on besides its prompt, method and seed: records made under other settings
    # are never mixed into one report (--resume and --from check it).
    run_settings = {"model": runtime.lm.name, "max_tokens": base.max_tokens, "alpha": base.alpha, "chains": base.chains,
                    "budget_samples": args.budget_samples, "budget_token_passes": args.budget_token_passes,
                    "budget_seconds": args.budget_seconds, "keywords_mode": args.keywords_mode, "set": extra, "accounting": ACCOUNTING}
    if any(row.get("keywords") for row in rows):
        run_settings["keyword_weight"] = runtime.keyword_weight
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = out / "records.jsonl"  # one line per finished run, so a stopped evaluation keeps what it did
    finished = _resumed(progress, run_settings) if args.resume and progress.exists() else {}
    if not finished:
        _set_aside(progress)
        progress.write_text("")
    # a time budget resumes at the token-pass budget of the runs made (not at a new calibration)
    seconds_per_pass = args.budget_seconds / next(iter(finished.values()))["budget"] if args.budget_seconds is not None and finished else None
    records = []
    total = len(rows) * len(seeds) * len(methods)
    started = time.perf_counter()
    for row in rows:
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        keywords = row.get("keywords")
        reward_options = {"keywords": keywords, "keywords_only": args.keywords_mode == "replace"} if keywords else {}
        for seed in seeds:
            for name in methods:
                earlier = finished.get((name, prompt_key(row), seed))
                if earlier is not None:
                    records.append(earlier)
                    continue
                # --set tunes the sea variants; what defines a variant (its name says it) stays as the name says
                overrides = {**({k: _parse_value(v) for k, v in extra.items()} if name.startswith("sea") else {}), **VARIANTS[name]}
                config = dataclasses.replace(base, seed=seed, **overrides)
                job = runtime.job(messages, config, **reward_options)
                scorers = [component for component, _ in job.reward.terms]
                if args.budget_seconds is not None and seconds_per_pass is None:
                    seconds_per_pass = _calibrate(runtime, job)
                    per_sample = base_sample_cost(config.max_tokens, scoring_passes(config.max_tokens, scorers))
                    print(f"{args.budget_seconds:g} s = {args.budget_seconds / seconds_per_pass:.0f} token-passes per prompt and method "
                          f"(about {args.budget_seconds / seconds_per_pass / per_sample:.1f} base samples)", file=sys.stderr)
                budget = _budget(args, config, scorers, seconds_per_pass)
                guides = sum(component.contrastive for component in scorers)
                job.config = size_to_budget(config, budget, scorers, guides if config.init == "guided" and config.use_reward else 0)
                tick = time.perf_counter()
                result = runtime.engine.run([job])[0]
                records.append({**_record(name, row, seed, result, time.perf_counter() - tick, budget, config.alpha), "run": run_settings})
                with progress.open("a") as handle:
                    handle.write(json.dumps(records[-1]) + "\n")
                _progress(f"[{len(records)}/{total}] {name:<12} {time.perf_counter() - started:7.0f}s")
    if sys.stderr.isatty():
        print(file=sys.stderr)
    results = summarise_runs(records, methods, args.baseline, {
        **run_settings, "prompts": str(args.prompts), "methods": methods, "seeds": seeds, "seconds_per_token_pass": seconds_per_pass})
    write_results(results, out)
    return results


def _checked_flags(args: argparse.Namespace) -> tuple[list[str], list[int], dict[str, str]]:
    """The methods, seeds and ``--set`` overrides the flags ask for, checked before anything loads; without a budget
    flag (and without --no-budget), the default budget."""
    if not args.prompts:
        raise SystemExit("--prompts is required (or --from DIR to report on earlier runs)")
    sized = sorted({item.split("=", 1)[0] for item in args.set} & SIZED_BY_BUDGET)
    if sized and not args.no_budget:
        raise SystemExit(f"--set {', '.join(sized)}: a budget sizes SEA's run (every method gets the same compute); "
                         "add --no-budget to run SEA as set")
    if not args.no_budget and args.budget_samples is None and args.budget_token_passes is None and args.budget_seconds is None:
        args.budget_samples = DEFAULT_BUDGET_SAMPLES
        print(f"every method gets the compute of {DEFAULT_BUDGET_SAMPLES:g} base samples per prompt (--budget-samples; "
              "--no-budget runs each at its own settings)", file=sys.stderr)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds}: write whole numbers separated by commas") from None
    bad = [item for item in args.set if "=" not in item or item.split("=", 1)[0] not in SEAConfig.__dataclass_fields__]
    if bad:
        raise SystemExit(f"--set {', '.join(bad)}: write KEY=VALUE with KEY a SEAConfig field (e.g. candidates=6)")
    return methods, seeds, dict(item.split("=", 1) for item in args.set)


def _refuse_prompts_past_the_model(runtime, rows: list[dict], source) -> None:
    """A prompt the model cannot take stops the evaluation before anything runs."""
    from app.runtime import PromptError

    for number, row in enumerate(rows, 1):
        try:
            runtime.prompt(row.get("messages") or [{"role": "user", "content": row["prompt"]}])
        except PromptError as exc:
            raise SystemExit(f"{source}: prompt {number}{' (' + str(row['id']) + ')' if 'id' in row else ''}: {exc}") from None


def _set_aside(progress: Path) -> None:
    """Keep an earlier run's records that a run without --resume starts over (they were emptied, without a word)."""
    if progress.exists() and progress.read_text().strip():
        kept = next(path for n in itertools.count(1)
                    if not (path := progress.with_name("records.previous.jsonl" if n == 1 else f"records.previous.{n}.jsonl")).exists())
        progress.replace(kept)
        print(f"{progress} held an earlier run's records: kept as {kept.name} (--resume continues a run)", file=sys.stderr)


def _resumed(progress: Path, run_settings: dict) -> dict:
    """The runs already in ``progress`` (by method, prompt and seed), which must have been made with ``run_settings``."""
    finished = {}
    for record in read_records(progress):
        if (record.get("run") or {}).get("accounting") != ACCOUNTING:
            raise SystemExit(f"{progress} holds runs charged for their compute as before 4 Dec 2026 (the principle reward's "
                             "L positions a row): they cannot be resumed at today's budgets; choose another --out")
        if record.get("run") != run_settings:
            raise SystemExit(f"{progress} holds runs made with other settings ({record.get('run')}, now {run_settings}): "
                             "resume with the same ones, or choose another --out")
        finished[run_key(record)] = record
    print(f"resuming: {len(finished)} runs already in {progress}", file=sys.stderr)
    return finished


def _budget(args: argparse.Namespace, config: SEAConfig, scorers: list, seconds_per_pass: float | None) -> float | None:
    """The run's compute budget in token-passes, from whichever budget flag was given (None: --no-budget)."""
    if args.budget_seconds is not None:
        return args.budget_seconds / seconds_per_pass
    if args.budget_samples is not None:
        return args.budget_samples * base_sample_cost(config.max_tokens, scoring_passes(config.max_tokens, scorers))
    return args.budget_token_passes


def _progress(line: str) -> None:
    if sys.stderr.isatty():  # one line, rewritten in place
        print("\r" + line, end="", file=sys.stderr, flush=True)
    else:  # a log file gets a line per run
        print(line, file=sys.stderr, flush=True)


def _calibrate(runtime, job) -> float:
    """Seconds per token-pass on this machine now: a Best-of-16 run of the first prompt, after a Best-of-2 warm-up.

    Without the warm-up the first call's one-off costs (allocations, lazy initialisation) are counted as compute
    speed and shrink every budget; a batch of 16 is timed because batched decoding costs less per token than one row.
    """
    def best_of(n: int):
        return runtime.engine.run([dataclasses.replace(job, config=dataclasses.replace(job.config, method="bon", samples=n))])[0]

    best_of(2)
    tick = time.perf_counter()
    result = best_of(16)
    return (time.perf_counter() - tick) / max(1, result.usage.compute)


def _record(name: str, row: dict, seed: int, result: AlignResult, seconds: float, budget: float | None, alpha: float) -> dict:
    """One run. ``energy`` is the full energy ``−(log pi_ref + alpha·r)`` for every method, so that the ablations
    without the reward or the reference term compare with the rest; the energy such a run minimised is ``own_energy``."""
    tokens = max(1, result.usage.completion_tokens)
    energy = -(result.log_prob_ref + alpha * result.reward)
    record = {k: v for k, v in row.items() if k != "prompt"}
    record.update({
        "method": name, "prompt": row.get("prompt"), "seed": seed, "text": result.text, "reward": result.reward,
        "energy": energy, "energy_per_token": energy / tokens, "own_energy": result.energy, "log_prob_ref": result.log_prob_ref,
        "log_prob_per_token": result.log_prob_ref / tokens, "refused": refused(result.text),
        "copies_principle": copies(result.text), "seconds": seconds,
        "compute": result.usage.compute, "prompt_compute": result.usage.prompt_token_passes, "budget": budget, "steps": result.timings.steps, "completion_tokens": result.usage.completion_tokens,
        "best_step": result.chains[result.chosen].best_step if result.chains else 0,  # 0: the answer is a start's sample as drawn
        "trace": [[s.energy for s in chain.trace] for chain in result.chains] if result.method == "sea" else None,
        "trace_reward": [[s.reward for s in chain.trace] for chain in result.chains] if result.method == "sea" else None,
    })
    if row.get("keywords"):
        coverage = keyword_coverage(result.text, row["keywords"])
        record.update({"coverage": coverage, "all_covered": coverage == 1.0})
    return record


def main(args: argparse.Namespace, settings: Settings) -> int:
    results = report_from(args) if args.from_dirs else run_eval(args, settings)
    print(report(results))
    return 0
