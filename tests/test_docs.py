from pathlib import Path

from app.settings import settings_markdown

README = Path(__file__).parents[1] / "README.md"


def test_readme_settings_table_is_generated_from_the_settings_object():
    assert settings_markdown() in README.read_text(), "run: .venv/bin/python -m app.settings README.md"
