"""The README's tables name every option in conf/, so they cannot drift."""

from __future__ import annotations

import re

import pytest

from mim_agg.cli import CONFIG_DIR
from tests.helpers import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
GROUPS = (
    "backbone", "heads", "dataset", "probe", "trainer", "logger", "experiment", "report", "cache",
    "knn", "debug", "callbacks",
)  # fmt: skip


def table_row(group: str) -> str:
    match = re.search(rf"^\| `{re.escape(group)}` \|(.*)\|$", README, flags=re.MULTILINE)
    assert match, f"README has no row for the {group} group"
    return match.group(1)


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_a_group_is_in_its_readme_row(group):
    row = table_row(group)
    for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
        assert f"`{option}`" in row, f"{group}={option} is missing from README.md"


def test_every_aggregator_has_a_row():
    for option in sorted(p.stem for p in (CONFIG_DIR / "aggregator").glob("*.yaml")):
        table_row(option)


def test_every_launcher_is_listed():
    row = table_row("hydra/launcher")
    for option in sorted(p.stem for p in (CONFIG_DIR / "hydra" / "launcher").glob("*.yaml")):
        assert f"`{option}`" in row


@pytest.mark.parametrize("group", ["cache", "knn"])
def test_every_option_of_a_single_config_group_is_in_its_row(group):
    from omegaconf import OmegaConf

    row = table_row(group)
    options = OmegaConf.load(CONFIG_DIR / group / "default.yaml")
    for key in options:
        if key != "defaults":
            assert f"`{key}`" in row, f"{group}.{key} is missing from README.md"
