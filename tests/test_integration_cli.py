"""The embedded SmolLM2 through the real `sea align` command (marked integration: loads the real model).

The command runs in a process of its own, forked from the test fork server that has already imported the app
(tests/server.py): the console script's `main` with its own stdout, stderr and exit status. The interpreter's own
start-up path (`python -m app.cli`) is covered by the integration server test.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.server import ForkedProcess

pytestmark = pytest.mark.integration


def test_sea_align_json_on_embedded_model(tmp_path):
    argv = ["align", "Name a fruit.", "--steps", "2", "--chains", "2", "--max-tokens", "8", "--seed", "0", "--json"]
    process = ForkedProcess(argv, dict(os.environ), tmp_path / "stderr.log", stdout_path=tmp_path / "stdout.json")
    status = process.wait(300)
    assert status == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    result = json.loads((tmp_path / "stdout.json").read_text())
    assert result["text"].strip()
    assert len(result["chains"]) == 2
    steps = result["timings"]["steps"]
    assert 1 <= steps <= 2  # the discrete update may converge early
    for chain in result["chains"]:
        assert len(chain["trace"]) == steps
        assert set(chain["trace"][0]) >= {"energy", "reward", "log_prob_ref", "changed"}
    assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["completion_tokens"] > 0
    assert set(result["timings"]) >= {"init", "langevin", "total"}
