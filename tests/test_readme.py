"""The README's tables name every option Hydra offers (files in conf/, the registries' generated
ones), and only those, so they cannot drift."""

from __future__ import annotations

import re

import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mim_agg.aggregators import AGGREGATORS, build_aggregator
from mim_agg.backbones import TokenLayout
from mim_agg.cli import CONFIG_DIR
from tests.helpers import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
GROUPS = (
    "backbone", "heads", "dataset", "probe", "trainer", "logger", "experiment", "report", "cache",
    "knn", "logreg", "debug", "callbacks",
)  # fmt: skip


def options(group: str) -> list[str]:
    """What ``group=...`` accepts: its files in conf/ and its generated options (``heads=all``)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def table_row(group: str) -> str:
    match = re.search(rf"^\| `{re.escape(group)}` \|(.*)\|$", README, flags=re.MULTILINE)
    assert match, f"README has no row for the {group} group"
    return match.group(1)


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_a_group_is_in_its_readme_row(group):
    row = table_row(group)
    for option in options(group):
        assert f"`{option}`" in row, f"{group}={option} is missing from README.md"


def first_column(header: str) -> list[str]:
    """The names in the first column of the table whose header row starts with ``header``."""
    table = README.split(f"\n| {header} |", 1)[1].split("\n\n", 1)[0]
    rows = table.splitlines()[2:]  # past the header's end and the |---| line
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row.split(" | ")[0])]


def assert_names(names: list[str], expected, where: str) -> None:
    """``names`` (as the README lists them) are ``expected``, each once."""
    twice = sorted({name for name in names if names.count(name) > 1})
    assert not twice, f"README's {where} names {twice} twice"
    missing = sorted(set(expected) - set(names))
    assert not missing, f"README's {where} lacks {missing}"
    unknown = sorted(set(names) - set(expected))
    assert not unknown, f"README's {where} names {unknown}, which are no options"


def test_the_aggregator_table_has_one_row_per_registered_aggregator():
    assert_names(first_column("aggregator"), AGGREGATORS, "aggregator table")


def test_the_aggregator_tables_parameter_counts_are_the_code_s_at_vit_b():
    """The "trainable at ViT-B" column: width 768, 12 heads, 14x14 patches, default options
    (efficient-probing's for its poolers), counted on the meta device (nothing allocated)."""
    table = README.split("\n| aggregator |", 1)[1].split("\n\n", 1)[0]
    vit_b = TokenLayout(768, 1, True, (14, 14), num_heads=12, depth=12)
    for row in table.splitlines()[2:]:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        name, count = cells[0].strip("`"), int(cells[2].replace(",", ""))
        with torch.device("meta"):
            aggregator = build_aggregator(name, vit_b)
        trainable = sum(p.numel() for p in aggregator.parameters() if p.requires_grad)
        assert count == trainable, f"README says {name} trains {count:,}; it trains {trainable:,}"


def test_the_dataset_table_names_each_dataset_option_once():
    assert_names(first_column("dataset"), options("dataset"), "dataset table")


def test_the_backbone_row_names_exactly_the_backbone_options():
    listed = table_row("backbone").split("; keys ")[0]  # then the keys every option sets
    names = re.findall(r"`([a-z0-9_]+)`", listed)
    assert_names(names, options("backbone"), "backbone row")


def test_every_launcher_is_listed():
    row = table_row("hydra/launcher")
    for option in sorted(p.stem for p in (CONFIG_DIR / "hydra" / "launcher").glob("*.yaml")):
        assert f"`{option}`" in row


@pytest.mark.parametrize("group", ["cache", "knn", "logreg"])
def test_every_option_of_a_single_config_group_is_in_its_row(group):
    from omegaconf import OmegaConf

    row = table_row(group)
    options = OmegaConf.load(CONFIG_DIR / group / "default.yaml")
    for key in options:
        if key != "defaults":
            assert f"`{key}`" in row, f"{group}.{key} is missing from README.md"
