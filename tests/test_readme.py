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
GROUPS = (  # backbone: its own table, below
    "heads", "dataset", "probe", "trainer", "logger", "experiment", "report", "cache", "knn",
    "logreg", "evaluate", "debug", "callbacks",
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


def table_rows(header: str) -> list[list[str]]:
    """The cells of the table whose header row starts with ``header``."""
    table = README.split(f"\n| {header} |", 1)[1].split("\n\n", 1)[0]
    rows = table.splitlines()[2:]  # past the header's end and the |---| line
    return [re.split(r"\s*\|\s*", row.strip().strip("|").strip()) for row in rows]


BACKBONE_TABLE = "config | family"
# efficient-probing's leaderboard (billpsomas/efficient-probing README, 37 rows), as the table's
# row column names them: each has its config or says why it has none.
LEADERBOARD_ROWS = (
    "DINOv3 ViT-7B/16", "MetaCLIP2 ViT-bigG/14-378", "EVA02-CLIP E-14-plus", "EVA02-CLIP E-14",
    "SigLIP2 SO400M/14", "PE-Core L-14/336", "MetaCLIP2 ViT-bigG/14", "SigLIP2 ViT-L/16",
    "DINOv3 ViT-L/16", "AIMv2 ViT-L/14", "SigLIP ViT-L/16", "DINOv2 ViT-L/14", "Franca ViT-L/14",
    "DINOv3 ViT-B/16", "DINOv2 ViT-B/14", "RADIO ViT-L/16", "EVA02 ViT-L/14", "CLIP ViT-L/14",
    "CAPI ViT-L/14", "BEiTv2 ViT-B/16", "RADIO ViT-B/16", "iBOT ViT-L/16", "Hiera ViT-H/16",
    "MAE ViT-L/16", "I-JEPA ViT-H/14", "iBOT ViT-B/16", "Hiera ViT-L/16", "CLIP ViT-B/16",
    "DINO ViT-B/16", "MoCov3 ViT-B/16", "Hiera ViT-B/16", "MAE ViT-B/16", "MaskFeat ViT-B/16",
    "MaskFeat ViT-L/16", "SimMIM ViT-B/16", "MAE ViT-S/16", "DiT-XL/2",
)  # fmt: skip


def test_the_backbone_table_names_each_backbone_option_once():
    names = [name for row in table_rows(BACKBONE_TABLE) for name in re.findall(r"`(.+?)`", row[0])]
    assert_names(names, options("backbone"), "backbone table")


def test_the_backbone_table_gives_each_configs_family_and_what_lp_and_ep_read():
    """Family, LP's and EP's representation as each ``conf/backbone`` file sets them (or the
    schema's defaults: ``[cls]`` for LP, the patches for EP)."""
    from omegaconf import OmegaConf

    lp = {"cls": "`[cls]`", "mean": "patch mean", "summary": "summary tokens"}
    ep = {"patch": "patches", "all": "`[cls]` + patches"}
    for config, family, linear, tokens, *_ in table_rows(BACKBONE_TABLE):
        if config == "—":
            continue
        values = OmegaConf.load(CONFIG_DIR / "backbone" / f"{config.strip('`')}.yaml")
        expected = [
            values.family,
            lp[values.get("linear_input", "cls")],
            ep[values.get("ep_tokens", "patch")],
        ]
        assert [family, linear, tokens] == expected, config


def test_the_backbone_table_lists_every_leaderboard_row_with_a_config_or_why_not():
    rows = table_rows(BACKBONE_TABLE)
    listed = [row[4].split(":")[0] for row in rows if row[4]]
    assert sorted(listed) == sorted(LEADERBOARD_ROWS), "README's backbone table vs leaderboard"
    for config, *_, notes in rows:
        assert config != "—" or notes.startswith("absent: "), notes


# Quoted in README, keyed to no config in published.csv, as a run of ours would not be its
# figure's run: the leaderboard's checkpoint is not capi_vitl's (CAPI IN-1k for its LVD-142M
# file).
NOT_THEIR_RUN = {"capi_vitl"}


def published_figure(config: str, column: str, ep_tokens: str | None = None) -> str:
    """``mim_agg/report/published.csv``'s figure for a README cell, to one decimal as the
    leaderboard prints it: ``column`` is k-NN, LP or EP on the representation ``config`` reads
    (EP on ``ep_tokens`` where given)."""
    from omegaconf import OmegaConf

    from mim_agg.report.published import figure_for

    values = OmegaConf.load(CONFIG_DIR / "backbone" / f"{config}.yaml")
    linear = values.get("linear_input", "cls")
    tokens = ep_tokens or values.get("ep_tokens", "patch")
    task, head, options = {
        "knn": ("knn", linear, {}),
        "linear": ("probe", linear, {}),
        "mean": ("probe", "mean", {}),
        "abmilp": ("probe", "abmilp", {"depth": 1, "tokens": "patch", "pos_cond": False}),
        "ep": ("probe", "efficient_probe", {"num_queries": 32, "d_out": 1, "tokens": tokens}),
    }[column]
    if head == "abmilp":
        options["self_attn"] = "none"
    figure = figure_for(config, "imagenet", task, head, options)
    assert figure is not None, (config, column)
    return f"{figure.value:.1f}"


def test_the_backbone_tables_published_figures_are_the_files():
    for config, *_, figures, _notes in table_rows(BACKBONE_TABLE):
        if config == "—" or not figures or config.strip("`") in NOT_THEIR_RUN:
            continue
        quoted = figures.split(": ")[1].split(" / ")
        expected = [published_figure(config.strip("`"), c) for c in ("knn", "linear", "ep")]
        assert quoted == expected, config


def test_the_which_aggregator_table_quotes_the_published_file():
    """Every figure of "Which aggregator to pick" is published.csv's, to one decimal."""
    configs = {
        "MAE ViT-B/16 (MIM)": "mae_vitb", "MAE ViT-L/16 (MIM)": "mae_vitl",
        "SimMIM ViT-B/16 (MIM)": "simmim_vitb", "CAPI ViT-L/14 (MIM)": "capi_vitl",
        "DINO ViT-B/16 (JEA)": "dino_vitb", "DINOv2 ViT-B/14 (JEA)": "dinov2_vitb",
    }  # fmt: skip
    rows = table_rows("backbone (family) | k-NN")
    assert [row[0] for row in rows] == list(configs)
    columns = ("knn", "linear", "mean", "abmilp", "ep")
    for label, *cells in rows:
        for column, cell in zip(columns, cells, strict=True):
            if cell and configs[label] not in NOT_THEIR_RUN:
                assert cell.split()[0] == published_figure(configs[label], column), (label, column)
    without_cls = rows[4][5].split("; ")[1]  # DINO's EP on the patches alone, beside its row's
    assert without_cls == f"{published_figure('dino_vitb', 'ep', 'patch')} without)"


def parameter_count(count: int) -> str:
    """``85.8M``, ``1.84B``: how the memory table writes a parameter count."""
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


@pytest.mark.slow  # builds 16 large skeletons (on the meta device: no memory, ~1 s each)
def test_the_memory_table_is_what_extraction_memory_computes():
    """Every row at ``cache.batch_size=256``, each config of a row alike; the table covers the
    big models (bfloat16 weights) and every DINOv3 ViT."""
    from omegaconf import OmegaConf

    from mim_agg.backbones.memory import extraction_memory, gigabytes
    from tests.helpers import compose_config

    rows = table_rows("config | parameters | weights | activations | total | reading attention")
    listed = {name for row in rows for name in re.findall(r"`([^`]+)`", row[0])}
    configs = sorted((CONFIG_DIR / "backbone").glob("*.yaml"))
    big = {p.stem for p in configs if OmegaConf.load(p).get("dtype") == "bfloat16"}
    dinov3 = {p.stem for p in configs if p.stem.startswith("dinov3_vit")}
    assert big | dinov3 <= listed, sorted(big | dinov3 - listed)
    for names, *cells in rows:
        for config in re.findall(r"`([^`]+)`", names):
            backbone = compose_config([f"backbone={config}"]).backbone
            plain = extraction_memory(backbone, 256, reads_attention=False)
            reading = extraction_memory(backbone, 256, reads_attention=True)
            sizes = (plain.weights, plain.activations, plain.total, reading.total)
            assert cells == [parameter_count(plain.parameters), *map(gigabytes, sizes)], config


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


def test_the_cache_footprint_is_the_cache_s_own_arithmetic():
    """Bytes per view (``bytes_per_view`` of the fields an extraction stores: all tokens for a
    learned head, the pooled ``[cls]`` for the linear probe) and ImageNet's totals (1,281,167
    train and 50,000 val images), for ViT-S/B/L/H at 224 px; float16 takes what bfloat16
    takes. Skeletons on the meta device: nothing allocated."""
    from mim_agg.backbones import TokenRequest
    from mim_agg.backbones.frozen import skeleton
    from mim_agg.cache.extract import bytes_per_view, field_shapes

    rows = table_rows("per view, 224 px")
    assert len(rows) == 8
    for what, *cells in rows:
        arch = re.findall(r"`([^`]+)`", what)[0]
        layout = skeleton(arch=arch, img_size=224).layout
        if "tokens" in what:
            shapes = field_shapes(layout, TokenRequest(tokens=True), {})
        else:
            shapes = field_shapes(layout, TokenRequest(pooled=("cls",)), {"cls": layout.dim})
        assert " x ".join(map(str, next(iter(shapes.values())))) in what, what
        sizes = [bytes_per_view(shapes, dtype) for dtype in ("float32", "bfloat16", "int8")]
        expected = [
            f"{s:,} B · {s * 1_281_167 / 1e9:,.1f} · {s * 50_000 / 1e9:,.2f} GB" for s in sizes
        ]
        assert cells == expected, what
        assert bytes_per_view(shapes, "float16") == sizes[1]
