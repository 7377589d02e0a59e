"""Peak memory of one step for a given number of chains, measured in a fresh process.

    python -m app.bench.memory --chains 8 --max-tokens 24 [--model PATH] [--device cpu] [--dtype auto]

Prints one JSON object. On CPU, torch allocates outside Python's allocator (tracemalloc sees nothing),
so the figure is the process's resident-set high-water mark: after the model is loaded, one 1-chain
step has run (thread pools, kernels) and the request of ``chains`` chains has drawn and scored its
initial chains, the kernel's peak counter is reset (``/proc/self/clear_refs``, value 5) and one step
runs; its memory is the new peak minus the resident set before it. Where that reset is not allowed the
``getrusage`` ``ru_maxrss`` delta from before the request's start is used instead (so it counts the start's
draw too; an underestimate when loading peaked higher). On CUDA: ``torch.cuda.max_memory_allocated`` minus
the memory allocated before the step.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure(model: str, chains: int, max_tokens: int, candidates: int, device: str, dtype: str, cache_dir: str, threads: int) -> dict:
    """MiB of one step of ``chains`` chains above the memory in use before it; runs in the calling process."""
    from app.bench.steps import setup
    from models.loading import load_lm

    if threads:
        torch.set_num_threads(threads)
    lm = load_lm(model or None, device=device, dtype=dtype, cache_dir=cache_dir or None)
    warm = setup(lm, 1, max_tokens, candidates)
    warm.engine.tick([warm.state])
    del warm
    peak_before_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bench = setup(lm, chains, max_tokens, candidates)  # draws and scores the initial chains: not part of the step
    bench.state.stale = set(range(bench.state.chains))
    gc.collect()
    cuda = lm.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        before_rss = _status_kib("VmRSS")
        if before_rss is not None and _reset_peak():
            method = "VmHWM after clear_refs"
            before = before_rss * 1024
        else:  # a lifetime peak: the start's draw may have set it higher than the step will, so it is counted too
            method = "ru_maxrss delta (with the start's draw)"
            before = peak_before_start
    bench.engine.tick([bench.state])  # gradient pass + exact scoring of chains × candidates rows
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    elif method.startswith("VmHWM"):
        peak = (_status_kib("VmHWM") or 0) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_mib = max(peak - before, 0) / 2**20
    return {"chains": chains, "max_tokens": max_tokens, "candidates": candidates, "method": method,
            "before_mib": before / 2**20, "peak_mib": peak / 2**20, "step_mib": step_mib, "per_chain_mib": step_mib / chains}


def measure_in_subprocess(chains: int, max_tokens: int, candidates: int, model: str = "", device: str = "auto",
                          dtype: str = "auto", cache_dir: str = "", threads: int = 0, timeout: float = 600.0) -> dict:
    """:func:`measure` in a fresh Python process (so no earlier allocation hides the peak)."""
    command = [sys.executable, "-m", "app.bench.memory", "--chains", str(chains), "--max-tokens", str(max_tokens),
               "--candidates", str(candidates), "--model", model, "--device", device, "--dtype", dtype,
               "--cache-dir", cache_dir, "--threads", str(threads)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_chain_slope(points: list[dict]) -> float | None:
    """MiB per extra chain between the smallest and the largest chain count (fixed costs cancel); None with one point."""
    if len(points) < 2:
        return None
    low, high = min(points, key=lambda p: p["chains"]), max(points, key=lambda p: p["chains"])
    return (high["step_mib"] - low["step_mib"]) / (high["chains"] - low["chains"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.chains, args.max_tokens, args.candidates, args.device, args.dtype,
                             args.cache_dir, args.threads)))


if __name__ == "__main__":
    main()
