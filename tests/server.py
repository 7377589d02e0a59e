"""Start the real `sea serve` (uvicorn) in a process of its own on a free loopback port, for end-to-end tests.

A fresh interpreter spends most of its start importing torch and transformers: 10-40 s on a loaded 2-core machine,
more than the rest of a typical end-to-end test. So servers are forked, by default, from a multiprocessing fork server
that has imported `app.cli` once; each child then runs `app.cli.main(["serve"])` with its own environment and log, as
the console script does, and is signalled, killed and waited for like any process. `fresh=True` starts a new
interpreter with `python -m app.cli serve` instead (the start-up path a user runs, kept by a few tests).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

_FORK_SERVER = multiprocessing.get_context("forkserver")
# Modules imported once by the fork server, before any thread exists there (nothing in them starts one).
_FORK_SERVER.set_forkserver_preload(["app.cli", "app.main"])


def run_cli(argv: list[str], env: dict[str, str], log_path: str, stdout_path: str | None = None) -> None:
    """The body of a forked `sea` process: the environment and output of a fresh one, then the console script's main.

    Both output streams go to ``log_path``, or stdout alone to ``stdout_path`` when given.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    log = os.open(log_path, flags, 0o644)
    out = os.open(stdout_path, flags, 0o644) if stdout_path else log
    os.dup2(out, 1)
    os.dup2(log, 2)
    os.close(log)
    if out != log:
        os.close(out)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    from app.cli import main

    sys.exit(main(argv))


class ForkedProcess:
    """The part of `subprocess.Popen` the tests use, over a process forked from the fork server."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, stdout_path: Path | None = None):
        # daemon: a server that a failed test leaves behind is stopped when pytest exits, not waited for.
        args = (argv, env, str(log_path), str(stdout_path) if stdout_path else None)
        self._process = _FORK_SERVER.Process(target=run_cli, args=args, daemon=True)
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(["sea", "serve"], timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy; returns its value, or fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout} s: {predicate}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, log_path: Path, fresh: bool = False, **settings: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SEA_MODEL": model, "SEA_HOST": "127.0.0.1", "SEA_PORT": str(self.port), "SEA_THREADS": "1"}
        env.update({f"SEA_{key.upper()}": str(value) for key, value in settings.items()})
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 -- a fresh server writes to it until stop() closes it
        if fresh:
            self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, stdout=self._log, stderr=subprocess.STDOUT)
        else:
            self.process = ForkedProcess(["serve"], env, log_path)

    def wait_ready(self, timeout: float = 300.0) -> list[int]:
        """Poll /ready until 200; returns the status codes seen on the way."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                status = httpx.get(self.url + "/ready", timeout=2).status_code
                seen.append(status)
                if status == 200:
                    return seen
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def serve_tiny(tmp_path_factory, **settings):
    """A generator for module-scoped fixtures: the real server on the tiny model; checks a clean exit at teardown."""
    from tests.tiny import save_tiny_lm, tiny_lm

    folder = save_tiny_lm(tiny_lm(), tmp_path_factory.mktemp("model") / "tiny-llama")
    proc = ServerProcess(str(folder), tmp_path_factory.mktemp("logs") / "server.log", **settings)
    try:
        proc.wait_ready()
    except BaseException:  # never leave a server behind a failed start
        proc.stop(signal.SIGKILL)
        raise
    yield proc
    assert proc.stop() == 0


def noting_the_event_loop(function, on_loop: list[bool]):
    """``function``, appending to ``on_loop`` whether each call ran on an event loop's thread (True) or off it."""

    def wrapped(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return function(*args, **kwargs)

    return wrapped
