import subprocess
import sys
from pathlib import Path

from app.settings import settings_markdown

README = Path(__file__).parents[1] / "README.md"


def test_readme_settings_table_is_generated_from_the_settings_object():
    assert settings_markdown() in README.read_text(), "run: .venv/bin/python -m app.settings README.md"


def test_commands_that_run_the_engine_in_process_offer_no_server_flags():
    from app.bench.command import NOT_FOR_THE_BENCH
    from app.cli import SERVER_SETTINGS, build_parser
    from app.settings import Settings

    assert SERVER_SETTINGS <= set(Settings.model_fields)  # every name is a real setting
    commands = build_parser()._subparsers._group_actions[0].choices
    flags = {name: {a.dest for a in parser._actions} for name, parser in commands.items()}
    assert {"model", "threads", "steps"} <= flags["align"] and not SERVER_SETTINGS & flags["align"]
    assert "default_steps" not in flags["align"]  # --steps sets it
    assert {"model", "prompts"} <= flags["eval"] and not SERVER_SETTINGS & flags["eval"]
    assert set(Settings.model_fields) <= flags["serve"]
    assert flags["bench"] & set(Settings.model_fields) == set(Settings.model_fields) - NOT_FOR_THE_BENCH  # its server's settings


def test_the_command_line_helps_without_loading_torch():
    # `sea --help`, `sea serve --help`, `sea align --help` answer at once: torch takes ~10 s to import on a small CPU
    code = ("import sys, app.cli\n"
            "for command in ('', 'serve', 'align', 'prepare'):\n"
            "    app.cli.build_parser(command).format_help()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
