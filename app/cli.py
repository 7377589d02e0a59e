"""The ``sea`` command: ``serve``, ``align``, ``prepare``, ``eval`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing

from pydantic import ValidationError

from app.settings import Settings, risky_settings, unknown_variables
from models.errors import ModelLoadError

# Settings of the HTTP service alone: `sea align` and `sea prepare`, which run the engine in-process, do not offer them.
SERVER_SETTINGS = frozenset({
    "host", "port", "api_keys", "api_keys_file", "metrics_require_key", "cors_origins", "max_batch_chains", "max_queue",
    "max_jobs_per_key",
    "batch_window_ms", "job_ttl_seconds", "request_timeout_seconds", "drain_seconds", "redis_url", "redis_prefix",
    "replica_lease_seconds", "job_max_attempts", "max_body_bytes",
})

# Request defaults that `sea align` sets with flags of its own (--steps, --chains…).
ALIGN_FLAGS = frozenset({"default_chains", "default_steps", "default_alpha", "default_max_tokens", "default_select"})


def _settings_flags(parser: argparse.ArgumentParser, server: bool = True, skip: frozenset[str] = frozenset(),
                    only: frozenset[str] | None = None) -> None:
    """One ``--flag`` per settings field (without ``server``, only those that apply outside the HTTP service; with
    ``only``, those alone), with the field's description as help (env ``SEA_<NAME>`` also works)."""
    group = parser.add_argument_group("settings (also from SEA_<NAME> environment variables)")
    for name, field in Settings.model_fields.items():
        if (not server and name in SERVER_SETTINGS) or name in skip or (only is not None and name not in only):
            continue
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        origin = typing.get_origin(kind)
        described = f"{field.description} ({_default_of(name)})"
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=described)
            continue
        py_type = {int: int, float: float}.get(kind, str)
        if origin is typing.Literal:
            group.add_argument(flag, dest=name, choices=typing.get_args(kind), default=None, help=described)
        else:
            group.add_argument(flag, dest=name, type=py_type, default=None, help=described)


def _default_of(name: str) -> str:
    """How --help names a setting's default: the built-in value and the environment variable that overrides it."""
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    if default is None or default == []:
        shown = "none"
    elif default == "":
        shown = "empty"
    elif isinstance(default, bool):
        shown = str(default).lower()
    elif isinstance(default, list | tuple):
        shown = ",".join(map(str, default))
    else:
        shown = str(default) if len(str(default)) <= 40 else "built in, see the README's settings table"
    return f"default: {shown}; env SEA_{name.upper()}"


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings: flags over ``SEA_*`` environment variables over defaults; invalid ones end the command with one
    line each, named as the environment variable (not a validation traceback)."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        def where(loc: tuple) -> str:
            name = str(loc[0])
            variable = f"SEA_{name.upper()}"
            return f"--{name.replace('_', '-')} ({variable}): " if name in overrides else f"{variable}: "

        problems = [(where(error["loc"]) if error["loc"] else "") + error["msg"].removeprefix("Value error, ") for error in exc.errors()]
        raise SystemExit("sea: invalid settings:\n  " + "\n  ".join(problems)) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar in the log at every start; our own line says it


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from app.main import create_app

    settings = settings_from(args)
    _setup_logging(settings.log_level)
    for problem in [*unknown_variables(), *risky_settings(settings)]:
        logging.getLogger("app.cli").warning("%s", problem)
    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Stop taking new work at once (/ready turns 503) and start the grace period (SEA_DRAIN_SECONDS) now;
            # the lifespan shutdown waits for the drain to end.
            app.state.service.request_drain()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.clear()  # a drained SIGTERM is a clean exit (status 0), not a re-raised signal

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False,  # the service logs each request once, with its id (RequestContext)
                            timeout_graceful_shutdown=int(settings.drain_seconds) + 5)
    Server(config).run()
    return 0


# The settings `sea prepare` uses: what it loads and where it caches it.
PREPARE_SETTINGS = frozenset({"model", "reward_model", "cache_dir", "log_level"})


def cmd_prepare(args: argparse.Namespace) -> int:
    """Load the configured models once: a GGUF model's dequantised cache is written, and a hub model (the reference
    or the reward model) is downloaded into the Hugging Face cache, so that a server started later finds both."""
    from models.loading import load_lm
    from models.rewards import load_sequence_classifier_reward

    settings = settings_from(args)
    _setup_logging(settings.log_level)
    lm = load_lm(settings.model or None, device="cpu", dtype="float32", cache_dir=settings.cache_dir or None)
    print(f"{lm.name} ready ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.0f}M parameters)")
    if settings.reward_model:
        reward = load_sequence_classifier_reward(settings.reward_model, lm, device="cpu", dtype="float32")
        print(f"reward model {reward.name} ready ({sum(p.numel() for p in reward.model.parameters()) / 1e6:.0f}M parameters)")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from app.api.schemas import MAX_ALIGN_LOGPROBS, LimitError, SEAParams
    from app.runtime import Runtime

    settings = settings_from(args)
    _setup_logging("warning" if args.json else settings.log_level)
    given = {"max_tokens": args.max_tokens, "chains": args.chains, "steps": args.steps, "alpha": args.alpha, "seed": args.seed,
             "method": args.method, "samples": args.samples, "select": args.select}
    try:  # the same defaults and limits as the HTTP API, checked before the models load
        if args.logprobs is not None and not 0 <= args.logprobs <= MAX_ALIGN_LOGPROBS:
            raise LimitError("logprobs", f"--logprobs must be between 0 and {MAX_ALIGN_LOGPROBS}")
        # as /align: every chain's (or sample's) tokens
        config = SEAParams(**{k: v for k, v in given.items() if v is not None}).to_config(settings, logprobs=args.logprobs)
    except LimitError as exc:
        raise SystemExit(f"sea align: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"sea align: {problems}") from None
    if not args.prompt.strip():
        raise SystemExit("sea align: the prompt is empty")
    keywords = [w for w in (args.keywords or "").split(",") if w.strip()]
    if args.keywords is not None and not keywords:
        raise SystemExit(f"sea align: --keywords {args.keywords!r} names no word")
    runtime = Runtime.load(settings)
    try:
        job = runtime.job([{"role": "user", "content": args.prompt}], config, terms=settings.reward_terms(), keywords=keywords or None)
    except ValueError as exc:  # keywords the model cannot spell, a chat its template refuses
        raise SystemExit(f"sea align: {exc}") from None
    error = runtime.prompt_error(job, settings.max_prompt_tokens)  # the API's check: the prompt's tokens and the context
    if error is not None:
        raise SystemExit(f"sea align: {error}")
    result = runtime.engine.run([job])[0]
    piece = runtime.text.piece
    if args.json:
        out = result.to_dict()
        out["log_prob_ref"] = result.log_prob_ref
        for chain in out["chains"]:
            for listed in chain["token_log_probs"] or []:
                listed["text"] = piece(listed["token"])[0]
        print(json.dumps(out))
        return 0
    print(result.text)
    for listed in result.chains[result.chosen].token_log_probs or []:
        alternatives = "  ".join(f"{piece(token)[0]!r} {log_prob:.2f}" for token, log_prob in listed.top)
        print(f"{listed.log_prob:8.2f}  {piece(listed.token)[0]!r:<16} {alternatives}", file=sys.stderr)
    print(
        f"\nreward {result.reward:.3f}  log pi_ref {result.log_prob_ref:.2f}  energy {result.energy:.2f}  "
        f"chain {result.chosen}  {result.timings.total:.1f}s ({result.timings.steps} steps)",
        file=sys.stderr,
    )
    for index, chain in enumerate(result.chains if result.method == "sea" else []):
        energies = " ".join(f"{s.energy:.1f}" for s in [chain.initial, *chain.trace])
        print(f"chain {index}: reward {chain.reward:.3f}  energy by step {energies}  (best at step {chain.best_step})  {chain.text!r}",
              file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from app.eval.run import main as eval_main

    settings = settings_from(args)
    _setup_logging("warning")
    return eval_main(args, settings)


def cmd_bench(args: argparse.Namespace) -> int:
    """1 when a part failed (its error is in the JSON, written all the same), else 0."""
    from app.bench.command import run

    settings = settings_from(args)
    _setup_logging("warning")
    return 1 if run(args, settings)["errors"] else 0


class CommandParser(argparse.ArgumentParser):
    """The ``sea`` parser, which knows its commands' own parsers (``commands``: name → parser)."""

    commands: dict[str, argparse.ArgumentParser]


def build_parser(command: str | None = None) -> CommandParser:
    """The ``sea`` parser; given the ``command`` about to run, only that command's arguments are built in full."""
    parser = CommandParser(prog="sea", description="Inference-time alignment with Simple Energy Adaptation.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices

    serve = sub.add_parser("serve", help="Start the HTTP service.")
    _settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    prepare = sub.add_parser("prepare", help="Load the models once and write their caches (e.g. at image build time).")
    _settings_flags(prepare, only=PREPARE_SETTINGS)
    prepare.set_defaults(func=cmd_prepare)

    align = sub.add_parser("align", help="Align one prompt and print the text and its trace.")
    align.add_argument("prompt", help="The user prompt.")
    align.add_argument("--steps", type=int, default=None, help=f"Langevin steps ({_default_of('default_steps')}).")
    align.add_argument("--chains", type=int, default=None, help=f"Parallel chains ({_default_of('default_chains')}).")
    align.add_argument("--max-tokens", type=int, default=None, help=f"Response length in tokens ({_default_of('default_max_tokens')}).")
    align.add_argument("--alpha", type=float, default=None, help=f"Reward weight in the energy ({_default_of('default_alpha')}).")
    align.add_argument("--seed", type=int, default=None, help="Random seed (same seed, same output).")
    align.add_argument("--method", choices=["sea", "bon", "sample", "args", "cbs"], default="sea",
                       help="sea, or a baseline: Best-of-N, one base sample, reward-guided decoding, chunk-level beam search.")
    align.add_argument("--samples", type=int, default=None, help="N for Best-of-N (default 16, or SEA_MAX_SAMPLES if lower).")
    align.add_argument("--select", choices=["reward", "energy"], help=f"How the returned chain is picked ({_default_of('default_select')}).")
    align.add_argument("--keywords", default=None, help="Comma-separated words; adds a keyword-coverage reward.")
    align.add_argument("--logprobs", type=int, default=None, metavar="N",
                       help="List each token's log-prob under the reference and its N (0-20) likeliest alternatives.")
    align.add_argument("--json", action="store_true", help="Print one JSON object with the full result.")
    _settings_flags(align, server=False, skip=ALIGN_FLAGS)
    align.set_defaults(func=cmd_align)

    evaluate = sub.add_parser("eval", help="Compare SEA and the baselines on a prompt file at equal compute.")
    evaluate.set_defaults(func=cmd_eval)
    bench = sub.add_parser("bench", help="Benchmark: step-time breakdown, FLOP/s, memory per chain, throughput through the real server.")
    bench.set_defaults(func=cmd_bench)
    # Their arguments come from modules that import torch (10 s on a small CPU): only for the command that runs.
    if command in (None, "eval"):
        from app.eval.run import add_eval_arguments

        add_eval_arguments(evaluate)
        _settings_flags(evaluate, server=False)  # it runs the engine in-process
    if command in (None, "bench"):
        from app.bench.command import NOT_FOR_THE_BENCH
        from app.bench.command import add_arguments as add_bench_arguments

        add_bench_arguments(bench)
        _settings_flags(bench, skip=NOT_FOR_THE_BENCH)  # --model, --threads, --compile, --max-batch-chains... also apply to the benchmarked server

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, with its usage (argparse's top-level error shows `sea`'s)
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except ModelLoadError as exc:  # a model the settings name cannot be served: one line, not a traceback
        print(f"sea {command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
