"""`sea bench` on the tiny random models: the JSON has every figure, and every figure is finite and positive.

No timing is asserted (figures depend on the machine and its load); these tests check structure only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import typing

import httpx
import pytest
import torch

import app.bench.command
from app.bench import serving
from app.bench.command import add_arguments, run_steps, server_settings, targets, write_json
from app.bench.memory import measure_in_subprocess, per_chain_slope
from app.bench.serving import percentile, sweep
from app.bench.steps import ModelShape, matmul_peak, pass_flops, setup, step_flops
from app.cli import build_parser
from app.settings import Settings
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
    assert point["chains"] == 3 and point["method"] in ("VmHWM after clear_refs", "ru_maxrss delta (with the start's draw)")
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
    assert args.concurrency == [1, 2, 4, 8, 16] and 32 in args.chains


def test_sea_bench_offers_no_flag_its_server_would_ignore(capsys):
    """The benchmarked server listens on a free port without keys or a shared store: `sea bench --port 8021` was
    accepted, listed in --help, and ignored."""
    with pytest.raises(SystemExit):
        build_parser("bench").parse_args(["bench", "--port", "8021"])
    assert "unrecognized arguments: --port" in capsys.readouterr().err
    assert build_parser("bench").parse_args(["bench", "--max-batch-chains", "8"]).max_batch_chains == 8  # what it passes on


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


def test_compile_whose_backward_fails_falls_back_to_eager_before_any_request(monkeypatch, caplog):
    """A compiled backbone compiles its backward at the first gradient, outside the forward that falls back: a compiler
    that failed there failed every SEA request (the gradient of a step), never falling back."""
    from app.engine.sea import Engine
    from app.engine.types import AlignJob, SEAConfig
    from models.rewards import PrincipleReward, Prompt, RewardMix
    from models.tokens import render_prompt

    class BackwardFails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden):
            return hidden.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("the compiler failed on the backward graph")

    def backward_broken(fn, **options):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            out.last_hidden_state = BackwardFails.apply(out.last_hidden_state)
            return out
        return run

    monkeypatch.setattr(torch, "compile", backward_broken)
    lm = tiny_lm()
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        assert compile_forward(lm) is True
    messages = [{"role": "user", "content": "tell me about dogs"}]
    job = AlignJob(Prompt(messages, render_prompt(lm.tokenizer, messages)), SEAConfig(max_tokens=6, chains=2, steps=2, seed=0),
                   RewardMix([(PrincipleReward(lm), 1.0)]))
    assert math.isfinite(Engine(lm).run([job])[0].energy)
    assert sum("failed in its first gradient pass" in record.message for record in caplog.records) == 1


def test_compile_of_a_model_whose_embedding_outgrows_its_tokenizer_stays_on(monkeypatch, caplog):
    """Qwen's and Phi-3's embeddings have rows past their tokenizers': the start's gradient pass fed soft one-hots as
    wide as the tokenizer, failed on the shape, and turned compiling off, blaming the compiler."""
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)  # a compiler that works
    lm = tiny_lm()
    lm.model.resize_token_embeddings(len(lm.tokenizer) + 8)
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        assert compile_forward(lm) is True
    assert not [record.message for record in caplog.records if "failed" in record.message]


def test_compiling_builds_a_graph_for_every_kind_of_pass_a_server_runs(monkeypatch):
    """SEA_COMPILE: the engine's passes (gradient and no-gradient scoring, decoding, cached prompts of every method)
    took more graphs than torch's default recompile limit of 8, and every kind of pass met after the eighth ran eagerly
    for good. Traced with torch's eager backend (no compiler: seconds, not the minutes inductor takes here)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from app.engine.sea import Engine
    from app.engine.types import AlignJob, SEAConfig
    from models.rewards import LexiconReward, PrincipleReward, Prompt, RewardMix
    from models.tokens import render_prompt

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, backend="eager", **options))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)  # restored after
    torch._dynamo.reset()
    counters.clear()
    lm = tiny_lm()
    assert compile_forward(lm)
    engine = Engine(lm)
    messages = [{"role": "user", "content": "tell me about dogs"}]
    prompt = Prompt(messages, render_prompt(lm.tokenizer, messages))
    principle = RewardMix([(PrincipleReward(lm), 1.0)])
    keywords = RewardMix([(LexiconReward.keywords(lm.tokenizer, ["dog", "cat"]), 1.0)])
    try:
        for reward, config in [
            (principle, SEAConfig(max_tokens=8, chains=2, steps=3)), (keywords, SEAConfig(max_tokens=10, chains=3, steps=3)),
            (principle, SEAConfig(max_tokens=8, chains=2, steps=2, update="logits")),
            (principle, SEAConfig(max_tokens=8, method="bon", samples=4)), (principle, SEAConfig(max_tokens=6, method="args")),
            (principle, SEAConfig(max_tokens=8, method="cbs")),
        ]:
            config.seed = 0
            assert math.isfinite(engine.run([AlignJob(prompt, config, reward)])[0].energy)
        assert counters["frames"]["total"] > 0
        assert counters["frames"]["ok"] == counters["frames"]["total"]  # none fell back to eager
    finally:
        torch._dynamo.reset()


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
                await serving._sweep(f"http://127.0.0.1:{port}", [1], {"prompt": "hi"}, alone_rounds=1, rounds=1, measured=[])
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


# What a fake `/align` answers: 2 chains, 1 step; timings and usage as the server reports them.
ALIGN_ANSWER = {"chains": [{}, {}], "timings": {"queue": 0.0, "total": 0.0, "steps": 1},
                "usage": {"completion_tokens": 4, "forward_token_passes": 8, "backward_token_passes": 8}}


async def _fake_align_server(answer):
    """A keep-alive HTTP server whose every request body goes to ``await answer(body) -> (status, dict)``."""
    async def serve(reader, writer):
        while not reader.at_eof():
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            status, out = await answer(json.loads(await reader.readexactly(length)))
            data = json.dumps(out).encode()
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(data), data))
            await writer.drain()
        writer.close()

    async def handle(reader, writer):
        # A handler cancelled when the test's loop ends is no error of the client's (asyncio 3.11 logs one).
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await serve(reader, writer)

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_failed_level_keeps_the_levels_measured_before_it():
    answered = []

    async def answer(body):
        answered.append(body["seed"])
        return (200, ALIGN_ANSWER) if len(answered) <= 2 else (429, {"error": {"message": "queue full"}})  # warm-up, level 1

    async def scenario() -> list[dict]:
        server = await _fake_align_server(answer)
        measured = []
        try:
            with pytest.raises(RuntimeError, match="answered 429"):
                await serving._sweep(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", [1, 2], {"prompt": "hi"},
                                     alone_rounds=1, rounds=1, measured=measured)
        finally:
            server.close()
        return measured

    assert [level["concurrency"] for level in asyncio.run(scenario())] == [1]


def test_each_level_above_one_sends_its_rounds_of_bursts():
    seeds = []

    async def scenario() -> list[dict]:
        async def answer(body):
            seeds.append(body["seed"])
            return 200, ALIGN_ANSWER

        server = await _fake_align_server(answer)
        try:
            measured = []
            await serving._sweep(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", [1, 2], {"prompt": "hi"},
                                 alone_rounds=2, rounds=3, measured=measured)
            return measured
        finally:
            server.close()

    assert [level["requests"] for level in asyncio.run(scenario())] == [2, 6]
    assert len(seeds) == 1 + 2 + 6 and len(set(seeds[3:])) == 6  # a warm-up, level 1, then 3 bursts of distinct seeds


def test_targets_count_a_level_without_throughput_as_not_measured():
    level = {"chain_steps_per_second": 0.0, "overhead_p50": 0.001}
    report = targets({"steps": [], "server": [{**level, "concurrency": 1}, {**level, "concurrency": 8}]}, on_gpu=False)
    verdicts = {row["target"]: row["verdict"] for row in report}
    assert verdicts["chain-steps/s, 8 concurrent requests / 1 alone"] == "NOT MEASURED"


@pytest.mark.parametrize(("flag", "value"), [
    ("--request-steps", "0"), ("--request-chains", "0"), ("--request-max-tokens", "-1"), ("--concurrency", "1,0"),
    ("--concurrency", ""), ("--chains", "x"), ("--max-tokens", "0"), ("--memory-chains", "0"), ("--uncached-chains", "0"),
    ("--candidates", "0"), ("--repeats", "-1"), ("--matmul-size", "0"), ("--alone-rounds", "0"), ("--rounds", "0"),
    ("--parts", "steps,gpu"),
])
def test_bench_flags_that_make_no_sense_are_refused_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser("bench").parse_args(["bench", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_the_json_writes_non_finite_figures_as_null(tmp_path):
    out = tmp_path / "runs" / "bench.json"
    write_json({"latency_p95": float("nan"), "levels": [{"ratio": float("inf")}, 1.5]}, str(out))

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(out.read_text(), parse_constant=refuse) == {"latency_p95": None, "levels": [{"ratio": None}, 1.5]}


def test_the_benchmarked_server_gets_no_api_keys_and_no_shared_queue(monkeypatch):
    monkeypatch.setenv("SEA_REDIS_URL", "redis://shared:6379/0")  # as in a deployed container
    monkeypatch.setenv("SEA_API_KEYS", "secret")
    chosen = server_settings(Settings(threads=1))
    assert chosen["redis_url"] == chosen["api_keys"] == chosen["api_keys_file"] == ""
    assert chosen["threads"] == 1 and "port" not in chosen


class _FakeBenchServer:
    """Stands in for `serving.BenchServer`: no process; records that it was stopped."""

    instances: typing.ClassVar[list] = []

    def __init__(self, settings: dict):
        self.settings, self.url, self.stopped = settings, "http://127.0.0.1:9", False
        _FakeBenchServer.instances.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stopped = True


def _level(concurrency: int) -> dict:
    return {"concurrency": concurrency, "requests": 1, "wall_seconds": 1.0, "chain_steps": 2, "chain_steps_per_second": 2.0,
            "completion_tokens_per_second": 4.0, "token_passes_per_second": 16.0, "latency_p50": 1.0, "latency_p95": 1.0,
            "queue_p50": 0.0, "queue_p95": 0.0, "overhead_p50": 0.001, "overhead_p95": float("nan")}


@pytest.fixture
def server_bench(tiny_folder, tmp_path, monkeypatch):
    """Runs `sea bench --parts server` with a fake server and the given fake sweep; returns (exit status, JSON)."""
    _FakeBenchServer.instances.clear()
    monkeypatch.setattr(serving, "BenchServer", _FakeBenchServer)
    out = tmp_path / "bench.json"

    def bench(fake_sweep) -> tuple[int, dict]:
        monkeypatch.setattr(serving, "sweep", fake_sweep)
        args = build_parser("bench").parse_args(["bench", "--model", str(tiny_folder), "--device", "cpu", "--threads", "1",
                                                 "--parts", "server", "--concurrency", "1,2,8", "--out", str(out)])
        return args.func(args), json.loads(out.read_text())

    return bench


def test_a_failed_server_sweep_keeps_its_levels_and_the_bench_exits_non_zero(server_bench):
    def fails_at_the_last_level(url, levels, body, alone_rounds, rounds, measured):
        measured += [_level(1), _level(2)]
        raise RuntimeError("POST /align answered 429: queue full")

    status, results = server_bench(fails_at_the_last_level)
    assert status == 1
    assert [level["concurrency"] for level in results["server"]] == [1, 2]
    assert results["server"][0]["overhead_p95"] is None  # NaN in strict JSON
    assert "answered 429" in results["errors"]["server"]
    assert {row["verdict"] for row in results["targets"]} == {"PASS", "NOT MEASURED"}
    assert _FakeBenchServer.instances[0].stopped


def test_the_json_is_written_when_the_targets_cannot_be_computed(server_bench, monkeypatch):
    def broken_targets(results, on_gpu):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(app.bench.command, "targets", broken_targets)
    status, results = server_bench(lambda url, levels, body, alone_rounds, rounds, measured: measured.append(_level(1)))
    assert status == 1 and "ZeroDivisionError" in results["errors"]["targets"]
    assert results["server"] == [_level(1) | {"overhead_p95": None}]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal closed
def test_sigterm_or_sighup_stops_the_benchmarked_server_before_the_bench_exits(server_bench, signum):
    def terminated_midway(url, levels, body, alone_rounds, rounds, measured):
        os.kill(os.getpid(), signum)
        time.sleep(1)  # the signal arrives in this call

    def ignore(signum, frame) -> None:  # in place of the default, which would end pytest
        pass

    previous = signal.signal(signum, ignore)
    try:
        with pytest.raises(SystemExit) as exit_info:
            server_bench(terminated_midway)
        assert exit_info.value.code == 128 + signum and _FakeBenchServer.instances[0].stopped
        assert signal.getsignal(signum) is ignore  # the bench put back the handler it found
    finally:
        signal.signal(signum, previous)


# A stand-in for `sea serve`: answers GET /ready on SEA_PORT, after a line in its log.
FAKE_SERVE = [sys.executable, "-c", """
import http.server, os, sys
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
print("fake sea serve: model loaded", file=sys.stderr, flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["SEA_PORT"])), Ready).serve_forever()
"""]


def test_the_benchmarked_server_is_out_of_reach_of_a_ctrl_c_and_stopped_after_one():
    with pytest.raises(KeyboardInterrupt), serving.BenchServer({}, command=FAKE_SERVE) as server:
        # Its own session: a Ctrl-C at the terminal (SIGINT to the foreground process group) reaches the bench alone.
        assert os.getsid(server.process.pid) != os.getsid(0)
        raise KeyboardInterrupt
    assert server.process.poll() is not None and not server.log_path.exists()


def test_a_server_that_died_midway_leaves_the_end_of_its_log_in_the_error():
    with pytest.raises(ConnectionRefusedError) as error, serving.BenchServer({}, command=FAKE_SERVE) as server:
        server.process.kill()
        server.process.wait()
        sweep(server.url, [1], {"prompt": "hi"}, alone_rounds=1)
    message = "".join(traceback.format_exception_only(error.value))
    assert "exited with -9" in message and "fake sea serve: model loaded" in message


def test_stop_gives_the_server_its_drain_time():
    server = serving.BenchServer({"drain_seconds": 100.0}, command=FAKE_SERVE)
    waited = []
    wait = server.process.wait
    server.process.wait = lambda timeout=None: waited.append(timeout) or wait(timeout)
    with server:
        pass
    assert waited[0] >= 105  # the server's own limit is drain_seconds + 5


def test_a_server_answering_on_our_port_is_not_taken_for_ours(monkeypatch):
    port = serving.free_port()  # another process took the port after free_port() let it go
    other = subprocess.Popen(FAKE_SERVE, env={**os.environ, "SEA_PORT": str(port)}, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # up to 30 s
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            pytest.fail("the stand-in server did not start")
        monkeypatch.setattr(serving, "free_port", lambda: port)
        # Ours finds the port taken once it has loaded (uvicorn binds after importing torch).
        taken = [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit('[Errno 98] address already in use')"]
        with pytest.raises(RuntimeError, match="(?s)exited with 1.*address already in use"), serving.BenchServer({}, command=taken):
            pass
    finally:
        other.kill()
        other.wait()


def test_step_memory_leaves_out_drawing_the_initial_chains(tiny_folder, monkeypatch):
    from app.bench import memory, steps

    setup_alone = steps.setup

    def setup_with_a_peak(*args, **kwargs):
        torch.ones(32 * 2**20).sum()  # 128 MiB for a moment, as drawing and scoring the initial chains takes
        return setup_alone(*args, **kwargs)

    monkeypatch.setattr(steps, "setup", setup_with_a_peak)
    point = memory.measure(str(tiny_folder), 2, 5, 2, "cpu", "auto", "", 0)
    if point["method"] != "VmHWM after clear_refs":
        pytest.skip("the peak counter cannot be reset here")
    assert point["step_mib"] < 64


def test_a_failed_request_cancels_the_rest_of_its_burst(caplog):
    async def answer(body):
        if body["seed"] == 0:
            return 429, {"error": {"message": "queue full"}}
        await asyncio.sleep(0.3)  # still running when seed 0 fails
        return 200, ALIGN_ANSWER

    loop = asyncio.new_event_loop()  # the server's, in a thread of its own: sweep() runs a loop of its own
    server = loop.run_until_complete(_fake_align_server(answer))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gc.collect()  # what earlier tests left behind says so now, not below
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            with pytest.raises(RuntimeError, match="answered 429"):
                sweep(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", [8], {"prompt": "hi"})
            gc.collect()  # a task whose exception nobody read says so when it is collected
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        server.close()
        handlers = asyncio.all_tasks(loop)
        if handlers:  # gather() of nothing needs a current loop, which this thread has not
            loop.run_until_complete(asyncio.gather(*handlers))  # its handlers end as their connections closed
        loop.close()
    # No request left reading a closed connection ("unhandled exception during asyncio.run() shutdown").
    assert [record.getMessage() for record in caplog.records if "_post()" in record.getMessage()] == []
