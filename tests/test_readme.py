"""The README documents every run-config key with its current default."""

from __future__ import annotations

from pathlib import Path

from stamen.common.boundary import markdown_table
from stamen.common.config import KEYS

README = Path(__file__).resolve().parent.parent / "README.md"


def _rendered(default: object) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, str):
        return f'"{default}"'
    return str(default)


def test_every_run_config_key_is_in_the_readme_table_with_its_default() -> None:
    text = README.read_text()
    for key in KEYS:
        assert f"| `{key.name}` | `{_rendered(key.default)}` |" in text, key.name


def test_privacy_boundary_table_in_the_readme_is_the_code_table() -> None:
    assert markdown_table() in README.read_text()
