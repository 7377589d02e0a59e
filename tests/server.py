"""Start the real `sea serve` (uvicorn) in a subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


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
    def __init__(self, model: str, log_path: Path, **settings: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SEA_MODEL": model, "SEA_HOST": "127.0.0.1", "SEA_PORT": str(self.port), "SEA_THREADS": "1"}
        env.update({f"SEA_{key.upper()}": str(value) for key, value in settings.items()})
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 -- the server writes to it until stop() closes it
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, stdout=self._log, stderr=subprocess.STDOUT)

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
