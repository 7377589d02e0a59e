"""The `sea` command's own logic (the commands on the real model: tests/test_integration_cli.py)."""

from __future__ import annotations

import pytest

from app import cli
from tests.tiny import save_tiny_lm, tiny_reward_model


def _flags(command: str) -> set[str]:
    return {option for action in cli.build_parser(command).commands[command]._actions for option in action.option_strings}


def test_prepare_offers_only_the_settings_it_uses():
    """It listed every engine setting (threads, device, request defaults…) and used three of them."""
    assert _flags("prepare") == {"-h", "--help", "--model", "--reward-model", "--cache-dir", "--log-level"}


def test_prepare_loads_the_reward_model_too(lm, tmp_path, capsys):
    """An image built with `sea prepare --reward-model X` must not fetch X when it serves."""
    model = save_tiny_lm(lm, tmp_path / "lm")
    reward = tmp_path / "rm"
    tiny_reward_model(lm.model.config.vocab_size).save_pretrained(reward)
    lm.tokenizer.save_pretrained(reward)
    assert cli.main(["prepare", "--model", str(model), "--reward-model", str(reward), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "reward model" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--chains", "0"], "--chains: Input should be greater than or equal to 1"),
    (["--max-tokens", "100000"], "max_tokens must be at most"),
])
def test_align_refuses_bad_flags_before_loading_the_models(monkeypatch, argv, message):
    def no_load(settings):
        raise AssertionError("the models were loaded before the flags were checked")

    monkeypatch.setattr("app.runtime.Runtime.load", no_load)
    with pytest.raises(SystemExit, match=message):
        cli.main(["align", "hello", *argv])


def test_align_with_sea_does_not_trip_the_best_of_n_limit(monkeypatch):
    """`--samples` matters to Best-of-N only: its default no longer trips SEA_MAX_SAMPLES below 16 for `--method sea`."""
    monkeypatch.setenv("SEA_MAX_SAMPLES", "8")

    class Runtime:
        def job(self, messages, config, **reward):
            raise SystemExit(f"would run {config.method} with {config.chains} chains")

    monkeypatch.setattr("app.runtime.Runtime.load", lambda settings: Runtime())
    with pytest.raises(SystemExit, match="would run sea with 4 chains"):
        cli.main(["align", "hello", "--method", "sea"])


@pytest.mark.parametrize("env, argv, line", [
    ({"SEA_PORT": "abc"}, [], "SEA_PORT: Input should be a valid integer"),
    ({}, ["--port", "0"], "--port (SEA_PORT): Input should be greater than or equal to 1"),
    ({}, ["--max-batch-chains", "2"], "SEA_DEFAULT_CHAINS (4) is past SEA_MAX_BATCH_CHAINS (2)"),
])
def test_invalid_settings_end_the_command_with_one_line_each_named_as_the_variable(monkeypatch, env, argv, line):
    """A flag or SEA_* variable that fails validation stopped `sea serve` (and every command) with a pydantic traceback."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", *argv])
    assert str(stopped.value.code).startswith(f"sea: invalid settings:\n  {line}")


def test_serve_warns_of_sea_variables_that_name_no_setting(monkeypatch, caplog):
    """SEA_API_KEY (for SEA_API_KEYS) left the API open without a word."""
    monkeypatch.setenv("SEA_API_KEY", "secret")
    monkeypatch.setenv("SEA_NOTHING_LIKE_IT", "1")

    def create_app(settings):
        raise SystemExit("stopped before serving")

    monkeypatch.setattr("app.main.create_app", create_app)
    with pytest.raises(SystemExit, match="stopped before serving"):
        cli.main(["serve"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "SEA_API_KEY is not a setting (did you mean SEA_API_KEYS?); ignored" in warnings
    assert "SEA_NOTHING_LIKE_IT is not a setting; ignored" in warnings


@pytest.mark.parametrize("argv, warned", [(["--host", "0.0.0.0"], True), (["--host", "::"], True), (["--host", "pod.local"], True),
                                          ([], False), (["--host", "::1"], False), (["--host", "localhost"], False),
                                          (["--host", "0.0.0.0", "--api-keys", "k1"], False), (["--cors-origins", "null"], True)])
def test_serve_warns_when_it_would_listen_beyond_this_machine_without_keys(monkeypatch, caplog, argv, warned):
    """A missing or misnamed Kubernetes Secret leaves SEA_API_KEYS unset, and the pod served an open API with an INFO
    line saying so; CORS for the origin 'null' lets any site's sandboxed iframe in (security review)."""
    monkeypatch.delenv("SEA_API_KEYS", raising=False)
    monkeypatch.setattr("app.main.create_app", lambda settings: (_ for _ in ()).throw(SystemExit("stopped before serving")))
    with pytest.raises(SystemExit, match="stopped before serving"):
        cli.main(["serve", *argv])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "is not a setting" not in r.getMessage()]
    assert bool(warnings) == warned, warnings


def test_a_model_that_cannot_load_ends_the_command_with_one_line(tmp_path, capsys):
    """It ended in a 25-frame traceback."""
    assert cli.main(["prepare", "--model", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sea prepare: could not load model") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["  "], "the prompt is empty"),  # it ran a full default request on nothing
    (["hi", "--keywords", ","], "names no word"),  # the keyword reward was dropped without a word
])
def test_align_refuses_an_empty_prompt_or_keyword_list_before_loading_the_models(monkeypatch, argv, message):
    monkeypatch.setattr("app.runtime.Runtime.load", lambda settings: pytest.fail("the models were loaded"))
    with pytest.raises(SystemExit, match=message):
        cli.main(["align", *argv])


def test_align_applies_the_api_s_prompt_limit(monkeypatch, lm):
    """--max-prompt-tokens was listed by --help and ignored."""
    from app.runtime import Runtime

    monkeypatch.setattr("app.runtime.Runtime.load", lambda settings: Runtime.from_lm(lm, settings))
    with pytest.raises(SystemExit, match="the prompt has .* tokens; the limit is 5"):
        cli.main(["align", "the dog and the cat play in the park", "--max-prompt-tokens", "5", "--steps", "0"])


def test_align_lists_token_log_probs_as_the_api_does(monkeypatch, lm, capsys):
    """`/align` took `logprobs`; `sea align` had no way to ask."""
    import json
    import re

    from app.runtime import Runtime

    monkeypatch.setattr("app.runtime.Runtime.load", lambda settings: Runtime.from_lm(lm, settings))
    argv = ["align", "tell me about tea", "--steps", "1", "--chains", "2", "--max-tokens", "6", "--seed", "0", "--logprobs", "2"]
    assert cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for chain in out["chains"]:
        listed = chain["token_log_probs"]
        assert len(listed) == chain["counted"] and all(len(t["top"]) == 2 and isinstance(t["text"], str) for t in listed)
        assert sum(t["log_prob"] for t in listed) == pytest.approx(chain["log_prob_ref"], abs=1e-3)
    assert cli.main(argv) == 0
    chosen = out["chains"][out["chosen"]]["token_log_probs"]
    lines = [line for line in capsys.readouterr().err.splitlines() if re.match(r" *-?\d+\.\d\d  ", line)]
    assert [float(line.split()[0]) for line in lines] == pytest.approx([t["log_prob"] for t in chosen], abs=0.006)


def test_align_refuses_logprobs_past_the_api_s_bound_before_loading_the_models(monkeypatch):
    monkeypatch.setattr("app.runtime.Runtime.load", lambda settings: pytest.fail("the models were loaded"))
    with pytest.raises(SystemExit, match="--logprobs must be between 0 and 20"):
        cli.main(["align", "hello", "--logprobs", "21"])


@pytest.mark.parametrize("command", ["serve", "prepare", "align", "eval", "bench"])
def test_help_names_each_settings_default_and_its_variable(command):
    """--help gave no defaults: a user had to read the README to learn that a request runs 20 steps."""
    text = " ".join(cli.build_parser(command).commands[command].format_help().split())
    assert "PydanticUndefined" not in text
    assert "(default: empty; env SEA_REWARD_MODEL)" in text
    if command != "bench":  # its server logs warnings only
        assert "(default: info; env SEA_LOG_LEVEL)" in text
    if command == "align":
        assert "Langevin steps (default: 20; env SEA_DEFAULT_STEPS)" in text
    if command == "serve":
        assert "(default: none; env SEA_API_KEYS)" in text and "(default: 8000; env SEA_PORT)" in text


def test_an_unknown_flag_is_refused_with_the_commands_own_usage(capsys):
    """`sea align x --bogus` printed the top-level usage (`sea [-h] {serve,…}`), not align's."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["align", "hello", "--bogus", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: sea align") and "sea align: error: unrecognized arguments: --bogus 1" in err
