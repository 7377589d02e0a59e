"""Throughput and latency through the real server: ``sea serve`` in a subprocess, N concurrent ``POST /align``.

Each response carries its own timings (``queue``: seconds waiting for the engine; ``total``: seconds from
entering the engine to the result), so the server's own overhead is the client's latency minus both.

The requests go out over plain keep-alive HTTP/1.1 connections (``Connection``), not through httpx: on a small
CPU, httpx spends 2-4 ms of its own per request (measured: 4.6 ms for ``GET /health`` that a bare socket
round-trips in 0.4 ms), as much as the server overhead being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from typing_extensions import Self


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening_sockets(port: int) -> set[str]:
    """``socket:[inode]`` of every TCP socket listening on ``port``, from Linux's /proc/net tables (empty elsewhere)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # state 0A: LISTEN
                    found.add(f"socket:[{fields[9]}]")
    return found


def _open_files(pid: int) -> set[str] | None:
    """What each open descriptor of process ``pid`` points to (``socket:[inode]`` for a socket); None without /proc."""
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    targets = set()
    for fd in descriptors:
        with contextlib.suppress(OSError):  # closed since the listing
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


SERVE_COMMAND = (sys.executable, "-m", "app.cli", "serve")
STOP_MARGIN_SECONDS = 30.0  # past the server's drain: uvicorn's own 5 s, then unloading


class BenchServer:
    """``sea serve`` on a free loopback port, with ``SEA_<NAME>`` settings; its log goes to a temporary file.

    It runs in a session of its own, so a Ctrl-C at the terminal reaches the bench alone, which then stops it.
    Leaving the ``with`` block on an error adds the server's state and the end of its log to the error as a note.
    """

    def __init__(self, settings: dict[str, str], command: Sequence[str] = SERVE_COMMAND):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **{f"SEA_{k.upper()}": str(v) for k, v in settings.items()}}
        env.update(SEA_HOST="127.0.0.1", SEA_PORT=str(self.port), SEA_LOG_LEVEL="warning")
        self.stop_seconds = float(settings.get("drain_seconds", 30.0)) + STOP_MARGIN_SECONDS
        self.log_path = Path(tempfile.mkstemp(prefix="sea-bench-server-", suffix=".log")[1])
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, characters: int = 4000) -> str:
        """The last ``characters`` of the server's log (its stdout and stderr)."""
        return self.log_path.read_text(errors="replace")[-characters:]

    def _answers_on_port(self) -> bool:
        """Whether our process holds the socket listening on the port: free_port() let the port go, and another
        process may have taken it before the server bound it. Where /proc is missing, whether ours is still running."""
        files = _open_files(self.process.pid)
        if files is None:
            return self.process.poll() is None
        return bool(files & _listening_sockets(self.port))

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sea serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200 and self._answers_on_port():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"sea serve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL once its drain time is over or when the wait is interrupted (a second Ctrl-C)."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(self.stop_seconds)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if isinstance(error, Exception):  # a crash or a refused request: the server's log says why
                state = "running" if self.process.poll() is None else f"exited with {self.process.returncode}"
                note = f"sea serve ({state}), the end of its log:\n{self.log_tail()}"
                if hasattr(error, "add_note"):  # Python 3.11 and later
                    error.add_note(note)
                else:
                    error.args = (*error.args, note)
            self.stop()
        finally:
            self.log_path.unlink(missing_ok=True)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, interpolating linearly between order statistics; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


REQUEST_TIMEOUT_SECONDS = 900.0  # per request: a burst of 16 default requests takes minutes on a small CPU


class Connection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads a response framed by Content-Length
    (every JSON answer of the server is)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post_json(self, path: str, body: dict) -> tuple[int, bytes]:
        """(status, response body) of ``POST path`` with ``body`` as JSON."""
        if self._streams is not None and (self._streams[0].at_eof() or self._streams[1].is_closing()):
            await self.close()  # the server closed it while idle (uvicorn keeps an idle connection 5 s), as HTTP allows
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        data = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode("latin-1") + data)
        await writer.drain()
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        if "content-length" not in headers:
            raise RuntimeError(f"POST {path}: a response without Content-Length ({status_line})")
        payload = await reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split()[1]), payload

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            await writer.wait_closed()


async def _post(connections: asyncio.Queue, body: dict) -> tuple[float, dict]:
    connection = await connections.get()
    try:
        tick = time.perf_counter()
        try:
            status, payload = await asyncio.wait_for(connection.post_json("/align", body), REQUEST_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            await connection.close()  # a late answer must not be read as the next request's
            raise RuntimeError(f"POST /align: no answer within {REQUEST_TIMEOUT_SECONDS:g} s") from None
        latency = time.perf_counter() - tick
    finally:
        connections.put_nowait(connection)
    if status != 200:
        raise RuntimeError(f"POST /align answered {status}: {payload[:500].decode(errors='replace')}")
    return latency, json.loads(payload)


async def _burst(connections: asyncio.Queue, bodies: list[dict]) -> tuple[float, list[tuple[float, dict]]]:
    """Send ``bodies`` at once; returns the wall seconds until the last answer and each (latency, response)."""
    tick = time.perf_counter()
    posts = [asyncio.ensure_future(_post(connections, body)) for body in bodies]
    try:
        answers = await asyncio.gather(*posts)
    except BaseException:  # one failed: the others are cancelled before the sweep closes their connections
        for post in posts:
            post.cancel()
        await asyncio.gather(*posts, return_exceptions=True)
        raise
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


def sweep(url: str, levels: list[int], body: dict, alone_rounds: int = 10, rounds: int = 1,
          measured: list[dict] | None = None) -> list[dict]:
    """For each concurrency level N, ``rounds`` bursts of N simultaneous ``/align`` requests (distinct seeds); figures per level.

    Level 1 sends ``alone_rounds`` requests one after the other, so its latency percentiles have a few samples.
    A first request warms the server up and is not counted. Each level's figures are appended to ``measured``
    (a new list by default) as soon as it is done, so a caller that passes its own keeps them when a later level
    fails. Returns ``measured``.
    """
    measured = [] if measured is None else measured
    asyncio.run(_sweep(url, levels, body, alone_rounds, rounds, measured))
    return measured


async def _sweep(url: str, levels: list[int], body: dict, alone_rounds: int, rounds: int, measured: list[dict]) -> None:
    # Keep-alive connections, as a real client keeps them: connecting is not the server's overhead.
    pool = [Connection(url) for _ in range(max(levels, default=1))]
    connections: asyncio.Queue = asyncio.Queue()
    for connection in pool:
        connections.put_nowait(connection)
    try:
        await _burst(connections, [{**body, "seed": 10_000}])
        for concurrency in levels:
            wall, answers = 0.0, []
            for burst in range(alone_rounds if concurrency == 1 else rounds):
                seeds = range(burst * concurrency, (burst + 1) * concurrency)
                seconds, answer = await _burst(connections, [{**body, "seed": seed} for seed in seeds])
                wall += seconds
                answers += answer
            measured.append(_level_figures(concurrency, wall, answers))
    finally:
        for connection in pool:
            await connection.close()
