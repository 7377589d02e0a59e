"""`sea bench` on the tiny random models: the JSON has every figure, and every figure is finite and positive.

No timing is asserted (figures depend on the machine and its load); these tests check structure only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math

import pytest
import torch

from app.bench import add_arguments, run_steps, serving, targets
from app.bench.memory import measure_in_subprocess, per_chain_slope
from app.bench.serving import percentile, sweep
from app.bench.steps import ModelShape, matmul_peak, pass_flops, setup, step_flops
from app.cli import build_parser
from models.loading import compile_forward
from tests.server import serve_tiny
from tests.tiny import save_tiny_lm, tiny_lm


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_lm(tiny_lm(), tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_tiny(tmp_path_factory)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_step_breakdown_has_every_part_with_and_without_the_cache(lm):
    measured = iter([3e9, 5e9, 4e9])  # a peak measured in a slow moment must not inflate the utilisation
    rows, peaks = run_steps(lm, chains=[2, 3], lengths=[4], candidates=2, repeats=1, uncached=[2], measure_peak=lambda: next(measured))
    assert peaks == [3e9, 5e9, 4e9]
    assert [r["utilisation"] for r in rows] == pytest.approx([r["flops_per_second"] / 5e9 for r in rows])
    assert _positive(matmul_peak(64, repeats=1))
    assert [(r["chains"], r["max_tokens"]) for r in rows] == [(2, 4), (3, 4)]
    for row in rows[:1]:
        for key in ("step", "step_uncached", "reference_forward_backward", "gradient_forward_backward", "straight_through",
                    "proposal", "exact_scoring_forward", "gradient_forward_backward_uncached", "exact_scoring_forward_uncached"):
            assert _positive(row["seconds"][key]), key
        assert math.isfinite(row["seconds"]["bookkeeping"]) and math.isfinite(row["seconds"]["reward_forward_backward"])
        for key in ("step_flops", "flops_per_second", "utilisation", "cached_over_uncached"):
            assert _positive(row[key]), key
        assert row["prompt_tokens"] < row["principle_prompt_tokens"]


def test_flop_count_follows_the_documented_formula(lm):
    shape = ModelShape.of(lm.model)
    params = sum(p.numel() for name, p in lm.model.named_parameters() if "embed" not in name and p.dim() == 2)
    assert shape.linear_params == params + shape.vocab * shape.hidden  # tied LM head counted once
    forward = pass_flops(shape, rows=3, prompt=10, length=5, backward=False)
    assert forward == pytest.approx(3 * 5 * (2 * shape.linear_params + 4 * shape.layers * shape.attention_width * (10 + 2.5)))
    backward = pass_flops(shape, 3, 10, 5, backward=True)
    assert backward - pass_flops(shape, 3, 10, 5, backward=True, straight_through=False) == pytest.approx(3 * 5 * 2 * shape.hidden * shape.vocab)
    assert backward > forward
    assert pass_flops(shape, 3, 10, 6, backward=False) > forward  # longer responses, more work


def test_step_flops_count_only_the_positions_each_edit_runs(lm):
    prepared = setup(lm, chains=2, max_tokens=6, candidates=2)
    whole = step_flops(prepared)
    prepared.edit_starts = [0, 0, 0, 0]
    assert step_flops(prepared) == pytest.approx(whole)
    prepared.edit_starts = [0, 2, 4, 4]
    assert step_flops(prepared) < whole


def test_memory_of_a_step_in_a_fresh_process(tiny_folder):
    point = measure_in_subprocess(3, 6, 2, model=str(tiny_folder), device="cpu", threads=1)
    assert point["chains"] == 3 and point["method"] in ("VmHWM after clear_refs", "ru_maxrss delta")
    assert point["peak_mib"] >= point["before_mib"] > 0
    assert point["step_mib"] >= 0 and point["per_chain_mib"] == pytest.approx(point["step_mib"] / 3)


def test_memory_per_chain_is_the_slope_between_chain_counts():
    points = [{"chains": 32, "step_mib": 100.0}, {"chains": 4, "step_mib": 30.0}]
    assert per_chain_slope(points) == pytest.approx(2.5)
    assert per_chain_slope(points[:1]) is None


def test_percentile_interpolates():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)
    assert math.isnan(percentile([], 0.5))


def test_concurrent_requests_through_the_real_server(server):
    body = {"prompt": "how can i help the dog", "chains": 2, "steps": 1, "max_tokens": 4, "alpha": 1.0}
    levels = sweep(server.url, [1, 2], body, alone_rounds=2)
    assert [level["concurrency"] for level in levels] == [1, 2]
    assert [level["requests"] for level in levels] == [2, 2]
    for level in levels:
        assert level["chain_steps"] == level["requests"] * 2  # 2 chains × 1 step each
        for key in ("wall_seconds", "chain_steps_per_second", "completion_tokens_per_second", "token_passes_per_second",
                    "latency_p50", "latency_p95"):
            assert _positive(level[key]), key
        for key in ("queue_p50", "queue_p95", "overhead_p50", "overhead_p95"):
            assert math.isfinite(level[key]) and level[key] >= 0, key
    report = targets({"steps": [], "server": levels}, on_gpu=False)
    verdicts = {row["target"]: row["verdict"] for row in report}
    assert verdicts["server overhead p50 (latency - queue - engine), 1 request"] in ("PASS", "MISS")
    assert verdicts["chain-steps/s, 8 concurrent requests / 1 alone"] == "NOT MEASURED"


def test_sea_bench_writes_json_with_targets(tiny_folder, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tiny_folder), "--device", "cpu", "--threads", "1", "--parts", "steps",
            "--chains", "2", "--uncached-chains", "2", "--max-tokens", "5", "--candidates", "2", "--repeats", "1", "--matmul-size", "64", "--out", str(out)]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    results = json.loads(out.read_text())
    assert results["model"] == "tiny-llama" and results["device"] == "cpu" and results["errors"] == {}
    assert _positive(results["matmul_peak_flops_per_second"])
    assert len(results["steps"]) == 1
    verdicts = [row["verdict"] for row in results["targets"]]
    assert verdicts[0] in ("PASS", "MISS") and set(verdicts[1:]) == {"NOT MEASURED"}
    printed = capsys.readouterr().out
    assert "Targets" in printed and "step, prompt cached" in printed


def test_bench_arguments_have_defaults_for_the_issue_grid():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.concurrency == "1,2,4,8,16" and "32" in args.chains.split(",")


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    lm = tiny_lm()
    ids = torch.tensor([[1, 5, 6, 7]])
    expected = lm.model(input_ids=ids).logits

    def broken(fn, **options):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        assert compile_forward(lm) is True
        first = lm.model(input_ids=ids).logits
        second = lm.model(input_ids=ids).logits
    assert torch.allclose(first, expected) and torch.allclose(second, expected)
    assert sum("running it eagerly" in record.message for record in caplog.records) == 1


def test_a_server_that_never_answers_fails_the_sweep_instead_of_hanging_it(monkeypatch):
    monkeypatch.setattr(serving, "REQUEST_TIMEOUT_SECONDS", 0.3)

    async def scenario() -> None:
        async def silent(reader, writer):
            await reader.read(1 << 16)  # takes the request, never answers
            await asyncio.sleep(5)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(RuntimeError, match="no answer within 0.3 s"):
                await serving._sweep(f"http://127.0.0.1:{port}", [1], {"prompt": "hi"}, alone_rounds=1)
        finally:
            server.close()

    asyncio.run(scenario())


def test_a_connection_the_server_closed_while_idle_is_opened_again():
    # uvicorn closes a keep-alive connection after 5 s idle; the sweep's connections wait longer between bursts.
    async def scenario() -> list[tuple[int, bytes]]:
        async def one_answer_then_close(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            writer.close()  # no "Connection: close" announced, as when an idle timeout fires

        server = await asyncio.start_server(one_answer_then_close, "127.0.0.1", 0)
        connection = serving.Connection(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            first = await connection.post_json("/align", {})
            await asyncio.sleep(0.2)  # the close reaches the client while it is idle
            return [first, await connection.post_json("/align", {})]
        finally:
            await connection.close()
            server.close()

    assert asyncio.run(scenario()) == [(200, b"{}"), (200, b"{}")]
