"""The embedded SmolLM2 through the real `sea align` command (marked integration: loads the real model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_sea_align_json_on_embedded_model():
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "align", "Name a fruit.", "--steps", "2", "--chains", "2", "--max-tokens", "8",
         "--seed", "0", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(out.stdout)
    assert result["text"].strip()
    assert len(result["chains"]) == 2
    steps = result["timings"]["steps"]
    assert 1 <= steps <= 2  # the discrete update may converge early
    for chain in result["chains"]:
        assert len(chain["trace"]) == steps
        assert set(chain["trace"][0]) >= {"energy", "reward", "log_prob_ref", "changed"}
    assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["completion_tokens"] > 0
    assert set(result["timings"]) >= {"init", "langevin", "total"}
