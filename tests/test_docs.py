from pathlib import Path

from app.settings import settings_markdown

README = Path(__file__).parents[1] / "README.md"


def test_readme_settings_table_is_generated_from_the_settings_object():
    assert settings_markdown() in README.read_text(), "run: .venv/bin/python -m app.settings README.md"


def test_commands_that_run_the_engine_in_process_offer_no_server_flags():
    from app.cli import SERVER_SETTINGS, build_parser
    from app.settings import Settings

    assert SERVER_SETTINGS <= set(Settings.model_fields)  # every name is a real setting
    commands = build_parser()._subparsers._group_actions[0].choices
    flags = {name: {a.dest for a in parser._actions} for name, parser in commands.items()}
    assert {"model", "threads", "default_steps"} <= flags["align"] and not SERVER_SETTINGS & flags["align"]
    assert set(Settings.model_fields) <= flags["serve"] and set(Settings.model_fields) <= flags["bench"]
