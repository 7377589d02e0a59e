"""Throughput and latency through the real server: ``sea serve`` in a subprocess, N concurrent ``POST /align``.

Each response carries its own timings (``queue``: seconds waiting for the engine; ``total``: seconds from
entering the engine to the result), so the server's own overhead is the client's latency minus both.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from typing_extensions import Self


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BenchServer:
    """``sea serve`` on a free loopback port, with ``SEA_<NAME>`` settings; its log goes to a temporary file."""

    def __init__(self, settings: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **{f"SEA_{k.upper()}": str(v) for k, v in settings.items()}}
        env.update(SEA_HOST="127.0.0.1", SEA_PORT=str(self.port), SEA_LOG_LEVEL="warning")
        self.log_path = Path(tempfile.mkstemp(prefix="sea-bench-server-", suffix=".log")[1])
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sea serve exited with {self.process.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"sea serve not ready after {timeout:.0f} s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, interpolating linearly between order statistics; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, dict]:
    tick = time.perf_counter()
    response = await client.post(url + "/align", json=body)
    latency = time.perf_counter() - tick
    response.raise_for_status()
    return latency, response.json()


async def _burst(client: httpx.AsyncClient, url: str, bodies: list[dict]) -> tuple[float, list[tuple[float, dict]]]:
    """Send ``bodies`` at once; returns the wall seconds until the last answer and each (latency, response)."""
    tick = time.perf_counter()
    answers = await asyncio.gather(*[_post(client, url, body) for body in bodies])
    return time.perf_counter() - tick, list(answers)


def _level_figures(concurrency: int, wall: float, answers: list[tuple[float, dict]]) -> dict:
    latencies = [latency for latency, _ in answers]
    queues = [out["timings"]["queue"] for _, out in answers]
    overheads = [latency - out["timings"]["queue"] - out["timings"]["total"] for latency, out in answers]
    chain_steps = sum(len(out["chains"]) * out["timings"]["steps"] for _, out in answers)
    tokens = sum(out["usage"]["completion_tokens"] for _, out in answers)
    passes = sum(out["usage"]["forward_token_passes"] + out["usage"]["backward_token_passes"] for _, out in answers)
    return {
        "concurrency": concurrency,
        "requests": len(answers),
        "wall_seconds": wall,
        "chain_steps": chain_steps,
        "chain_steps_per_second": chain_steps / wall,
        "completion_tokens_per_second": tokens / wall,
        "token_passes_per_second": passes / wall,
        "latency_p50": percentile(latencies, 0.5),
        "latency_p95": percentile(latencies, 0.95),
        "queue_p50": percentile(queues, 0.5),
        "queue_p95": percentile(queues, 0.95),
        "overhead_p50": percentile(overheads, 0.5),
        "overhead_p95": percentile(overheads, 0.95),
    }


def sweep(url: str, levels: list[int], body: dict, alone_rounds: int = 5) -> list[dict]:
    """For each concurrency level N, N simultaneous ``/align`` requests (distinct seeds); figures per level.

    Level 1 sends ``alone_rounds`` requests one after the other, so its latency percentiles have a few samples.
    A first request warms the server up and is not counted.
    """
    return asyncio.run(_sweep(url, levels, body, alone_rounds))


async def _sweep(url: str, levels: list[int], body: dict, alone_rounds: int) -> list[dict]:
    # One client with keep-alive connections, as a real client keeps them: connecting is not the server's overhead.
    connections = max(levels, default=1) + 1
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        await _burst(client, url, [{**body, "seed": 10_000}])
        results = []
        for concurrency in levels:
            if concurrency == 1:
                wall, answers = 0.0, []
                for seed in range(max(alone_rounds, 1)):
                    seconds, answer = await _burst(client, url, [{**body, "seed": seed}])
                    wall += seconds
                    answers += answer
            else:
                wall, answers = await _burst(client, url, [{**body, "seed": seed} for seed in range(concurrency)])
            results.append(_level_figures(concurrency, wall, answers))
        return results
