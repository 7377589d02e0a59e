"""The embedded SmolLM2 behind the real server (marked integration: loads the real model)."""

from __future__ import annotations

import openai
import pytest

from tests.server import ServerProcess

pytestmark = pytest.mark.integration


def test_embedded_model_through_the_server_and_openai_client(tmp_path):
    server = ServerProcess("", tmp_path / "server.log", fresh=True, threads=2)  # the path `make serve` takes
    try:
        seen = server.wait_ready(timeout=300)
        assert seen[0] == 503 and seen[-1] == 200  # up (and answering) while the model loads, ready after
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        chat = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, seed=0,
            extra_body={"sea": {"steps": 2, "chains": 2}},
        )
        assert chat.choices[0].message.content.strip()
        sea = chat.model_extra["sea"]
        assert 1 <= sea["timings"]["steps"] <= 2 and len(sea["chains"]) == 2
        assert sea["backward_token_passes"] > 0
    finally:
        assert server.stop() == 0
