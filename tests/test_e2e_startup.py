"""Start-up and shutdown of the real server: readiness while models are missing, clean exit on SIGTERM."""

from __future__ import annotations

import httpx

from tests.server import ServerProcess


def test_ready_stays_503_while_no_model_is_loaded_and_health_answers(tmp_path):
    server = ServerProcess(str(tmp_path / "missing.gguf"), tmp_path / "server.log")
    try:
        seen = []
        for _ in range(200):
            try:
                seen.append(httpx.get(server.url + "/health", timeout=2).status_code)
                break
            except httpx.TransportError:
                import time

                time.sleep(0.05)
        assert seen == [200]
        ready = httpx.get(server.url + "/ready", timeout=2)
        assert ready.status_code == 503 and ready.json()["error"]["type"] == "overloaded_error"
        align = httpx.post(server.url + "/align", json={"prompt": "hi"}, timeout=5)
        assert align.status_code == 503 and "Retry-After" in align.headers
    finally:
        assert server.stop() == 0
    assert "model loading failed" in (tmp_path / "server.log").read_text()
