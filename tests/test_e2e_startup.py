"""Start-up and shutdown of the real server: probes when the models fail to load, clean exit on SIGTERM."""

from __future__ import annotations

import httpx

from app.service.service import LOAD_FAILED
from tests.server import ServerProcess, wait_for


def test_a_server_whose_model_fails_to_load_fails_its_liveness_check_and_says_why(tmp_path):
    """It answered /health 200 forever and told clients to retry in 5 s: nothing would ever restart it."""
    log = tmp_path / "server.log"
    server = ServerProcess(str(tmp_path / "missing.gguf"), log)
    try:
        wait_for(lambda: "model loading failed" in log.read_text(), 60)
        for path in ("/health", "/ready"):
            probe = httpx.get(server.url + path, timeout=2)
            assert probe.status_code == 503 and "Retry-After" not in probe.headers, path
            assert probe.json()["error"]["message"] == LOAD_FAILED
            assert probe.json()["error"]["type"] == "server_error"  # a restart ends it, not waiting (was overloaded_error)
            assert httpx.head(server.url + path, timeout=2).status_code == 503  # load balancers probing with HEAD
        align = httpx.post(server.url + "/align", json={"prompt": "hi"}, timeout=5)
        assert align.status_code == 503 and "Retry-After" not in align.headers
        assert align.json()["error"]["message"] == LOAD_FAILED and align.json()["error"]["type"] == "server_error"
    finally:
        assert server.stop() == 0
