"""The table of settings (config.ROWS) and what documents it: the README's table of
variables and `.env.example` name every variable the table reads, and nothing else."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

import config
from config import ROWS, Settings, SettingsArgs
from tests.conftest import ROOT

VARIABLE = re.compile(r"`([A-Z][A-Z0-9_]*)`")


def table_variables() -> set[str]:
    return {row.env for row in ROWS.values()}


def readme_variables() -> set[str]:
    """The variables in the first column of the tables under the README's `## Settings`."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no table of variables under ## Settings"
    return {name for line in rows for name in VARIABLE.findall(line.split("|")[1])}


def env_example_variables() -> set[str]:
    """The variables `.env.example` sets, commented out or not."""
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, flags=re.M))


def test_every_variable_has_one_row() -> None:
    names = [row.env for row in ROWS.values()]
    assert len(names) == len(set(names))
    assert all(row.doc for row in ROWS.values())


@pytest.mark.parametrize(
    ("where", "documented"),
    [("README.md", readme_variables), (".env.example", env_example_variables)],
)
def test_the_documented_variables_are_the_tables(
    where: str, documented: typing.Callable[[], set[str]]
) -> None:
    found, known = documented(), table_variables()
    left_out, unknown = known - found, found - known  # unknown: documented, read by nothing
    assert (where, left_out, unknown) == (where, set(), set())


def test_the_constructors_keywords_are_the_fields() -> None:
    hints = typing.get_type_hints(Settings)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(Settings) if f.init}
    assert typing.get_type_hints(SettingsArgs) == fields


def test_only_with_names_a_variable_of_the_table() -> None:
    assert {row.only_with for row in ROWS.values()} - {""} <= table_variables()


def test_the_defaults_pass_their_own_checks() -> None:
    settings = Settings()
    for name, row in ROWS.items():
        if row.check is not None:
            row.check(getattr(settings, name))
    assert config.DEFAULT_MODELS[settings.provider] == settings.model
