"""``sea bench``'s command: its flags, the parts it runs (steps, memory, server) and the targets it checks, the
figures printed and written as JSON."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import signal
import time
import traceback

import torch

from app.arguments import positive_int, whole_number
from app.settings import Settings

PARTS = ("steps", "memory", "server")

# (label, key in breakdown()); indented rows are the parts of the step above them.
STEP_ROWS = [
    ("step, prompt cached", "step"),
    ("step, no prompt cache", "step_uncached"),
    ("  gradient: reference LM fwd + bwd", "reference_forward_backward"),
    ("  gradient: reward fwd + bwd", "reward_forward_backward"),
    ("    of which straight-through g @ Wᵀ", "straight_through"),
    ("  proposal (edit scores, draws)", "proposal"),
    ("  exact scoring of candidates (fwd)", "exact_scoring_forward"),
    ("  bookkeeping (step minus parts)", "bookkeeping"),
    ("  gradient fwd + bwd, no cache", "gradient_forward_backward_uncached"),
    ("  exact scoring, no cache", "exact_scoring_forward_uncached"),
]


def _non_negative(text: str) -> int:
    return whole_number(text, 0)


def _positives_or_none(text: str) -> list[int]:
    return [positive_int(x) for x in text.split(",") if x.strip()]


def _positives(text: str) -> list[int]:
    values = _positives_or_none(text)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(PARTS)}, got {text!r}")
    return parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's flags; each is checked here, so a value that makes no sense stops the run before it starts."""
    parser.add_argument("--parts", type=_parts, default=",".join(PARTS),
                        help="Comma-separated parts to run: steps, memory, server (the targets are always computed).")
    parser.add_argument("--chains", type=_positives, default="4,32", help="Step grid: chains per request (comma-separated).")
    parser.add_argument("--max-tokens", type=_positives, default="24", help="Step grid: response lengths L (comma-separated).")
    parser.add_argument("--candidates", type=positive_int, default=4, help="Edits scored exactly per chain per step.")
    parser.add_argument("--repeats", type=_non_negative, default=3,
                        help="Timed repeats per figure (after one warm-up); medians. 0: one call, no warm-up (slow machines).")
    parser.add_argument("--uncached-chains", type=_positives_or_none, default="4,32",
                        help="Chain counts of the grid whose step is also timed without the prompt cache (the slowest part; '' for none).")
    parser.add_argument("--matmul-size", type=positive_int, default=2048, help="Side of the square matmul that measures the peak.")
    parser.add_argument("--memory-chains", type=_positives, default="4,32", help="Chain counts whose step memory is measured (fresh process each).")
    parser.add_argument("--concurrency", type=_positives, default="1,2,4,8,16", help="Concurrent /align requests per burst (comma-separated).")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="Bursts per concurrency level above 1 (their latency percentiles; with one burst of N, p95 is near the slowest).")
    parser.add_argument("--request-chains", type=positive_int, default=4, help="Chains per /align request in the server part.")
    parser.add_argument("--request-steps", type=positive_int, default=3, help="Steps per /align request in the server part.")
    parser.add_argument("--request-max-tokens", type=positive_int, default=24, help="max_tokens per /align request in the server part.")
    parser.add_argument("--alone-rounds", type=positive_int, default=10,
                        help="Requests sent one after another at concurrency 1 (its latency and overhead percentiles).")
    parser.add_argument("--out", default="runs/bench.json", help="Where to write the JSON results ('' for none).")


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_steps(lm, chains: list[int], lengths: list[int], candidates: int, repeats: int, uncached: list[int],
              measure_peak) -> tuple[list[dict], list[float]]:
    """The step breakdown for every (chains, L) of the grid, with FLOPs and utilisation of the matmul peak (FLOP/s).

    ``measure_peak()`` measures the peak; it runs before the grid and after every point of it, and every utilisation
    is against the highest of them: on a shared machine one short measurement can land in a slow moment, and a low
    peak would overstate the utilisation. Returns the rows and the peaks measured. The step without the prompt cache
    is timed too for the chain counts in ``uncached``.
    """
    from app.bench.steps import breakdown, setup, step_flops

    rows, peaks = [], [measure_peak()]
    for count in chains:
        for length in lengths:
            print(f"steps: {count} chains, L={length}...", flush=True)
            prepared = setup(lm, count, length, candidates)
            seconds = breakdown(prepared, repeats, count in uncached)
            peaks.append(measure_peak())
            flops = step_flops(prepared)
            entry = {"chains": count, "max_tokens": length, "candidates": candidates, "prompt_tokens": len(prepared.prompts[0]),
                     "principle_prompt_tokens": len(prepared.prompts[1]), "seconds": seconds, "step_flops": flops,
                     "flops_per_second": flops / seconds["step"]}
            if "step_uncached" in seconds:
                entry["cached_over_uncached"] = seconds["step"] / seconds["step_uncached"]
            rows.append(entry)
    for entry in rows:
        entry["utilisation"] = entry["flops_per_second"] / max(peaks)
    return rows, peaks


def targets(results: dict, on_gpu: bool) -> list[dict]:
    """Each target of issue #8 with its measured value (None when the run did not measure it) and PASS/MISS."""
    out = []

    def add(name: str, value: float | None, goal: float, higher: bool, unit: str = "") -> None:
        if value is None or not math.isfinite(value):
            verdict = "NOT MEASURED"
        else:
            verdict = "PASS" if (value >= goal if higher else value <= goal) else "MISS"
        out.append({"target": name, "measured": value, "goal": goal, "higher_is_better": higher, "unit": unit, "verdict": verdict})

    steps = results.get("steps", [])
    with_ratio = [s for s in steps if "cached_over_uncached" in s]
    reference = next((s for s in with_ratio if (s["chains"], s["max_tokens"]) == (4, 24)), with_ratio[0] if with_ratio else None)
    label = f"C={reference['chains']}, L={reference['max_tokens']}" if reference else "C=4, L=24"
    add(f"cached step / uncached step ({label})", reference["cached_over_uncached"] if reference else None, 0.45, False, "x")
    levels = {level["concurrency"]: level for level in results.get("server", [])}
    ratio = None
    if 1 in levels and 8 in levels and levels[1]["chain_steps_per_second"]:  # 0 chain-steps/s alone: nothing to compare
        ratio = levels[8]["chain_steps_per_second"] / levels[1]["chain_steps_per_second"]
    add("chain-steps/s, 8 concurrent requests / 1 alone", ratio, 5.0 if on_gpu else 1.5, True, "x")
    if not on_gpu:
        largest = max(steps, key=lambda s: s["chains"], default=None)
        value = largest["utilisation"] if largest and largest["chains"] >= 32 else None
        add("step FLOP/s / matmul peak at 32 chains (CPU)", value, 0.40, True)
    overhead = levels[1]["overhead_p50"] * 1000 if 1 in levels else None
    add("server overhead p50 (latency - queue - engine), 1 request", overhead, 5.0, False, "ms")
    return out


def _print_steps(steps: list[dict], peaks: list[float], repeats: int) -> None:
    runs = f"median of {repeats} after a warm-up" if repeats else "one run, no warm-up"
    print(f"\nStep time, seconds ({runs}; discrete update, every chain re-graded, all candidates scored)")
    heads = [f"C={s['chains']} L={s['max_tokens']}" for s in steps]
    print(f"{'part':<40}" + "".join(f"{h:>14}" for h in heads))
    for label, key in STEP_ROWS:
        if any(key in s["seconds"] for s in steps):
            print(f"{label:<40}" + "".join(f"{s['seconds'][key]:14.3f}" if key in s["seconds"] else f"{'-':>14}" for s in steps))
    extra = [("cached / uncached", "cached_over_uncached", "{:14.2f}"), ("GFLOP per step", "step_flops", "{:14.2f}"),
             ("achieved GFLOP/s", "flops_per_second", "{:14.2f}"), ("utilisation of matmul peak", "utilisation", "{:14.1%}")]
    for label, key, fmt in extra:
        scale = 1e-9 if "flop" in key else 1
        print(f"{label:<40}" + "".join(fmt.format(s[key] * scale) if key in s else f"{'-':>14}" for s in steps))
    print(f"prompt {steps[0]['prompt_tokens']} tokens (principle-prompted {steps[0]['principle_prompt_tokens']}); "
          f"matmul peak {max(peaks) / 1e9:.1f} GFLOP/s (the best of {len(peaks)} measured through the grid: "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)})")


def _print_server(levels: list[dict]) -> None:
    print("\nThrough the real server (POST /align; seconds unless marked)")
    print(f"{'requests':>8} {'chain-steps/s':>14} {'tokens/s':>9} {'passes/s':>9} {'lat p50':>8} {'lat p95':>8} "
          f"{'queue p50':>9} {'queue p95':>9} {'overhead p50':>13}")
    for lv in levels:
        print(f"{lv['concurrency']:>8} {lv['chain_steps_per_second']:14.2f} {lv['completion_tokens_per_second']:9.2f} "
              f"{lv['token_passes_per_second']:9.0f} {lv['latency_p50']:8.2f} {lv['latency_p95']:8.2f} {lv['queue_p50']:9.2f} "
              f"{lv['queue_p95']:9.2f} {lv['overhead_p50'] * 1000:10.1f} ms")


def _print_targets(rows: list[dict]) -> None:
    print("\nTargets")
    for row in rows:
        value = "-" if row["measured"] is None else f"{row['measured']:.3g}{row['unit']}"
        goal = f"{'>=' if row['higher_is_better'] else '<='} {row['goal']:g}{row['unit']}"
        print(f"{row['target']:<62} {value:>10}  goal {goal:<9} {row['verdict']}")


def _memory_part(args: argparse.Namespace, settings: Settings) -> dict:
    from app.bench import memory

    points = []
    for count in args.memory_chains:
        print(f"memory: {count} chains (fresh process)...", flush=True)
        points.append(memory.measure_in_subprocess(count, args.max_tokens[0], args.candidates, settings.model, settings.device,
                                                   settings.dtype, settings.cache_dir, settings.threads))
    slope = memory.per_chain_slope(points)
    print(f"\nPeak memory of one step ({points[0]['method']}; fresh process per count)")
    for point in points:
        print(f"  {point['chains']:>3} chains, L={point['max_tokens']}: {point['step_mib']:8.1f} MiB  ({point['per_chain_mib']:.2f} MiB per chain)")
    if slope is not None:
        print(f"  per extra chain (slope): {slope:.2f} MiB")
    return {"points": points, "per_chain_mib_slope": slope}


# Settings the benchmarked server never takes from the run: it listens on a free local port, logs warnings only, and
# has no API keys and no shared job store (a Redis URL would make it take a real queue's jobs). `sea bench` has no
# flags for them.
NOT_FOR_THE_BENCH = frozenset({"host", "port", "log_level", "api_keys", "api_keys_file", "redis_url"})


def server_settings(settings: Settings) -> dict:
    """The settings the benchmarked server gets: this run's scalar ones (lists and secrets are not copied and would
    come from the environment), less :data:`NOT_FOR_THE_BENCH`."""
    chosen = {name: value for name, value in settings.model_dump().items()
              if name not in NOT_FOR_THE_BENCH and isinstance(value, (str, int, float, bool))}
    chosen.update(api_keys="", api_keys_file="", redis_url="")
    return chosen


def _request_body(args: argparse.Namespace) -> dict:
    from app.bench.steps import PROMPT

    return {"prompt": PROMPT, "chains": args.request_chains, "steps": args.request_steps, "max_tokens": args.request_max_tokens, "alpha": 1.0}


def _server_part(args: argparse.Namespace, settings: Settings, levels: list[dict]) -> None:
    """Appends each concurrency level's figures to ``levels`` as it is measured (kept when a later one fails)."""
    from app.bench import serving

    print("server: starting sea serve...", flush=True)
    with serving.BenchServer(server_settings(settings)) as server:
        serving.sweep(server.url, args.concurrency, _request_body(args), alone_rounds=args.alone_rounds, rounds=args.rounds,
                      measured=levels)


def _finite_or_null(value):
    """``value`` with every NaN and infinity in it, at any depth, replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def write_json(results: dict, path: str) -> None:
    """Writes ``results`` as strict JSON: a figure that is not a finite number is written as null."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(_finite_or_null(results), handle, indent=1, allow_nan=False)


@contextlib.contextmanager
def _sigterm_exits():
    """While the bench runs, SIGTERM and SIGHUP (a closed terminal) raise SystemExit(128 + the signal): Python's
    default handlers end the process without running ``finally`` blocks, which would leave the benchmarked server (in
    a session of its own) running. The previous handlers come back after."""
    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {signum: signal.signal(signum, exit_now) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(args: argparse.Namespace, settings: Settings) -> dict:
    """Run the chosen parts, print them and the targets, write ``args.out``; returns the results.

    A part that fails is recorded under ``errors`` and the others still run (a long run keeps what it measured);
    the results of a server part that failed keep the concurrency levels measured before the failure.
    """
    with _sigterm_exits():
        return _run(args, settings)


def _run(args: argparse.Namespace, settings: Settings) -> dict:
    from app.bench import steps
    from models.loading import compile_forward, load_lm

    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    results: dict = {"command": "sea bench", "compile": settings.compile, "errors": {}}
    lm = load_lm(settings.model or None, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir or None)
    if settings.compile:
        results["compiled"] = compile_forward(lm)
    results.update(model=lm.name, device=str(lm.device), dtype=str(lm.dtype).replace("torch.", ""), machine=machine())
    print(f"sea bench: {lm.name} on {lm.device} ({results['dtype']}), {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, compile {settings.compile}", flush=True)
    on_gpu = lm.device.type == "cuda"

    def attempt(part: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a failed part is reported; the others still run
            # The exception's notes too: a failed server part carries the end of the server's log in one.
            message = "".join(traceback.format_exception_only(exc)).strip()
            results["errors"][part] = message
            print(f"\n{part}: FAILED ({message})", flush=True)

    def steps_part(lm) -> None:
        results["model_shape"] = dataclasses.asdict(steps.ModelShape.of(lm.model))
        measure = functools.partial(steps.matmul_peak, args.matmul_size, device=lm.device, dtype=lm.dtype)
        results["steps"], peaks = run_steps(lm, args.chains, args.max_tokens, args.candidates, args.repeats,
                                            args.uncached_chains, measure)
        results["matmul_peak_flops_per_second"], results["matmul_peaks_flops_per_second"] = max(peaks), peaks
        _print_steps(results["steps"], peaks, args.repeats)

    def server_part() -> None:
        results["server_request"], results["server"] = _request_body(args), []
        _server_part(args, settings, results["server"])

    def targets_part() -> None:
        results["targets"] = targets(results, on_gpu)
        _print_targets(results["targets"])

    if "steps" in args.parts:
        attempt("steps", functools.partial(steps_part, lm))
    del lm  # the server and the memory processes load their own copies: free this one's memory for them
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    if "memory" in args.parts:
        attempt("memory", lambda: results.update(memory=_memory_part(args, settings)))
    if "server" in args.parts:
        attempt("server", server_part)
        if results.get("server"):
            _print_server(results["server"])
    attempt("targets", targets_part)
    results["seconds"] = time.perf_counter() - started
    print(f"\nbench took {results['seconds']:.0f} s")
    if args.out:
        write_json(results, args.out)
        print(f"wrote {args.out}")
    return results
