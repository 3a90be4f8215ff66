"""The paper's attention diagnostics: exact statistics, streaming, figures, no-[cls] models."""

import importlib.util
import json
import math
import runpy
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from mim_agg.analysis.figures import (
    attention_maps_figure,
    embedding_figure,
    save_figure,
)
from mim_agg.analysis.statistics import (
    StatisticsAccumulator,
    attention_statistics,
    update_ratios,
)
from mim_agg.analysis.tracing import trace_blocks
from mim_agg.backbones import FrozenBackbone
from mim_agg.runs.runner import run_task as run
from mim_agg.runs.runner import run_task as run_probe
from mim_agg.validation import backbone_arguments
from tests.helpers import FAST, PROJECT_ROOT, compose_config

EPS = 1e-6
ANALYZE = [
    *FAST,
    "task=analyze",
    "dataset=digits",
    "analysis.num_images=24",
    "analysis.batch_size=8",
    "analysis.embedding_images=24",
]


def naive_statistics(model, images, prefix):
    """Loops over tokens, straight from the definitions; returns {name: [per-block value]}."""
    stats = {}
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks:
            attn = block.attn
            B, T, D = x.shape
            qkv = (
                attn.qkv(block.norm1(x)).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            )
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            A = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1).double()
            y = block.ls1(attn(block.norm1(x))).double()
            patches = range(prefix, T)
            values = {
                n: []
                for n in (
                    "cls_self_attn",
                    "patch_self_attn",
                    "cls_self_attn_rel",
                    "patch_self_attn_rel",
                    "cls_to_patch_attn",
                    "patch_to_cls_attn",
                    "cls_patch_entropy",
                    "patch_patch_entropy",
                )
            }
            for b in range(B):
                for h in range(attn.num_heads):
                    a = A[b, h]
                    m = {i: sum(a[i, j] for j in patches) for i in range(T)}

                    def entropy(i, a=a, m=m, patches=patches):
                        p = [a[i, j] / (m[i] + EPS) for j in patches]
                        return -sum(pj * math.log(pj + EPS) for pj in p)

                    n = len(patches)
                    values["cls_self_attn"].append(a[0, 0])
                    values["patch_self_attn"].append(sum(a[i, i] for i in patches) / n)
                    values["cls_self_attn_rel"].append(a[0, 0] / (m[0] + EPS))
                    values["patch_self_attn_rel"].append(
                        sum(a[i, i] / (m[i] + EPS) for i in patches) / n
                    )
                    values["cls_to_patch_attn"].append(sum(a[0, j] for j in patches) / n)
                    values["patch_to_cls_attn"].append(sum(a[i, 0] for i in patches) / n)
                    values["cls_patch_entropy"].append(entropy(0))
                    values["patch_patch_entropy"].append(sum(entropy(i) for i in patches) / n)
            ratios = {"cls_update_ratio": [], "patch_update_ratio": []}
            for b in range(B):
                norm = lambda v: float(v.norm())  # noqa: E731
                ratios["cls_update_ratio"].append(norm(y[b, 0]) / (norm(x[b, 0].double()) + EPS))
                ratios["patch_update_ratio"].append(
                    sum(norm(y[b, i]) / (norm(x[b, i].double()) + EPS) for i in patches)
                    / len(patches)
                )
            for name, vals in {**values, **ratios}.items():
                stats.setdefault(name, []).append(float(sum(vals) / len(vals)))
            x = block(x)
    return stats


def traced_statistics(backbone, images, batch_size):
    accumulator = StatisticsAccumulator(len(backbone.model.blocks))
    prefix, has_cls = backbone.layout.num_prefix_tokens, backbone.layout.has_cls
    with trace_blocks(backbone.model.blocks) as records:
        for batch in images.split(batch_size):
            backbone(batch)
            for index, record in enumerate(records):
                accumulator.add(index, attention_statistics(record.attn, prefix, has_cls))
                accumulator.add(index, update_ratios(record.input, record.update, prefix, has_cls))
            accumulator.count(len(batch))
    return accumulator.result(backbone.layout.num_patches)


@pytest.mark.parametrize(
    "arch,size", [("vit_tiny_patch16_224", 32), ("vit_small_patch14_reg4_dinov2", 28)]
)
def test_every_statistic_matches_a_naive_loop(arch, size):
    torch.manual_seed(0)
    backbone = FrozenBackbone(arch, img_size=size)
    images = torch.randn(3, 3, size, size)
    result = traced_statistics(backbone, images, batch_size=3)
    expected = naive_statistics(backbone.model, images, backbone.layout.num_prefix_tokens)
    assert set(result["stats"]) == set(expected)
    for name, values in expected.items():
        assert result["stats"][name] == pytest.approx(values, rel=1e-6), name
    assert result["max_entropy"] == pytest.approx(math.log(4))
    assert (
        len(result["per_head"]["cls_patch_entropy"][0]) == backbone.model.blocks[0].attn.num_heads
    )


def test_streaming_equals_one_big_batch():
    torch.manual_seed(0)
    backbone = FrozenBackbone("vit_tiny_patch16_224", img_size=32)
    images = torch.randn(7, 3, 32, 32)
    streamed, whole = (traced_statistics(backbone, images, size) for size in (2, 7))
    assert streamed["num_images"] == whole["num_images"] == 7
    for name, values in whole["stats"].items():
        assert streamed["stats"][name] == pytest.approx(values, rel=1e-6), name
    for name, blocks in whole["per_head"].items():
        for streamed_heads, heads in zip(streamed["per_head"][name], blocks, strict=True):
            assert streamed_heads == pytest.approx(heads, rel=1e-6), name


def test_uniform_attention_has_maximal_entropy():
    backbone = FrozenBackbone("vit_tiny_patch16_224", img_size=64)
    dim = backbone.layout.dim
    for block in backbone.model.blocks:  # q = k = 0: every query attends uniformly
        block.attn.qkv.weight[: 2 * dim].zero_()
        block.attn.qkv.bias[: 2 * dim].zero_()
    result = traced_statistics(backbone, torch.randn(2, 3, 64, 64), 2)
    ln_n = math.log(16)
    for name in ("cls_patch_entropy", "patch_patch_entropy"):
        assert result["stats"][name] == pytest.approx([ln_n] * 12, rel=1e-5)
    assert result["stats"]["cls_self_attn"] == pytest.approx([1 / 17] * 12)


def test_identity_attention_gives_self_attention_of_one():
    attn = torch.eye(5).expand(2, 3, 5, 5)
    stats = attention_statistics(attn, num_prefix_tokens=1, has_cls=True)
    for name in ("cls_self_attn", "patch_self_attn", "patch_self_attn_rel"):
        assert torch.allclose(stats[name], torch.ones(2, 3, dtype=torch.float64), atol=1e-5), name
    assert torch.all(stats["cls_to_patch_attn"] == 0) and torch.all(stats["patch_to_cls_attn"] == 0)
    assert torch.allclose(
        stats["patch_patch_entropy"], torch.zeros(2, 3, dtype=torch.float64), atol=1e-4
    )


@pytest.fixture(scope="module")
def analysis_run(tmp_path_factory):
    """The analysis of ``ANALYZE``: its result, its run folder, and its figures as matplotlib
    objects (``{file stem: Figure}``), caught on their way to their PNG files."""
    from mim_agg.tasks import analyze

    tmp_path = tmp_path_factory.mktemp("analysis")
    figures = {}

    def keep(fig, path):
        figures[path.stem] = fig
        return save_figure(fig, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analyze, "save_figure", keep)
        result = run(compose_config(ANALYZE, tmp_path))
    return result, tmp_path / "run", figures


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_analyze_writes_stats_and_figures(analysis_run):
    result, output_dir, _ = analysis_run
    saved = json.loads((output_dir / "attention_stats.json").read_text())
    assert saved["backbone"] == "vit_tiny_patch16_224" and saved["num_images"] == 24
    assert set(saved) == {"backbone", "family", "num_images", "max_entropy", "stats", "per_head"}
    assert saved["family"] == "none"  # from backbone.family, never guessed from a name
    assert all(len(values) == 12 for values in saved["stats"].values())
    for name in ("attention_stats.png", "attention_maps.png", "embedding.png"):
        data = (output_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


CONTEXT = (
    "backbone.arch=vit_tiny_patch16_224",
    "backbone.weights=random",
    "dataset.name=digits",
    "analysis.split=val",
)


def colorbar_axes(fig):
    return [ax for ax in fig.axes if hasattr(ax, "_colorbar")]


def test_every_figure_names_backbone_weights_dataset_split_and_count(analysis_run):
    _, _, figures = analysis_run
    assert set(figures) == {"attention_stats", "attention_maps", "embedding"}
    counts = {"attention_stats": "24 images", "attention_maps": "4 images", "embedding": "24 im"}
    for name, fig in figures.items():
        title = fig.get_suptitle().replace("\n", " ")  # wrapped at the figure's width
        assert all(part in title for part in CONTEXT) and counts[name] in title, (name, title)


def test_statistics_panels_have_units_ticks_and_a_legend_with_ln_n(analysis_run):
    fig = analysis_run[2]["attention_stats"]
    fig.draw_without_rendering()
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 10
    for ax in panels:
        assert ax.get_xlabel() == "block (backbone.block: 0 = first)" and ax.get_ylabel()
        assert ax.get_ylim()[0] == 0, ax.get_title()  # a flat statistic looks flat
        assert ax.yaxis.get_major_formatter().get_offset() == "", ax.get_title()
        decimals = [len(t.get_text().partition(".")[2]) for t in ax.get_yticklabels()]
        assert max(decimals) <= 3, (ax.get_title(), decimals)
    entropy = {ax.get_title(): ax.get_ylabel() for ax in panels}["[cls] entropy over patches"]
    assert entropy == "entropy (nats)"
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "vit_tiny_patch16_224 (random)",
        f"uniform over N = 4 patches: ln N = {math.log(4):.3f} nats",
    ]


def test_attention_maps_share_one_scale_whose_colorbar_marks_uniform(analysis_run):
    fig = analysis_run[2]["attention_maps"]
    fig.draw_without_rendering()
    (bar_ax,) = colorbar_axes(fig)
    colorbar = bar_ax._colorbar
    panels = [ax for ax in fig.axes if ax is not bar_ax]
    maps = [ax for ax in panels if ax.images[0].get_array().ndim == 2]  # images are RGB
    assert len(maps) == 4 * 2  # 4 images x (head mean, lowest-entropy head)
    norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in maps}
    assert norms == {(0, colorbar.norm.vmax)} and colorbar.norm.vmin == 0
    assert all(ax.images[0].get_array().shape == (2, 2) for ax in maps)  # one cell per patch
    assert "uniform 1/N = 0.25" in [t.get_text() for t in bar_ax.get_yticklabels()]
    assert "N = 4" in bar_ax.get_ylabel()
    assert all(ax.get_xlabel().startswith("H = ") for ax in maps)
    pictures = [ax for ax in panels if ax not in maps]
    assert all(ax.get_ylabel().startswith("class ") for ax in pictures)


def test_a_map_column_equal_to_an_earlier_one_says_so():
    torch.manual_seed(0)
    mean = torch.rand(2, 3, 3).softmax(-1)
    maps = {"head mean": mean, "sharpest head": mean.clone(), "probe": mean.flip(-1)}
    fig = attention_maps_figure(torch.rand(2, 3, 12, 12), maps, [3, 7], "maps")
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes[:4]]  # the first row
    assert titles[0] == "image" and titles[1] == "head mean"
    assert titles[2] == "sharpest head (identical to column 2)" and titles[3] == "probe"


def test_embedding_legend_has_one_entry_per_class_shown(analysis_run):
    fig = analysis_run[2]["embedding"]
    (legend,) = fig.legends
    entries = [t.get_text() for t in legend.get_texts()]
    assert legend.get_title().get_text() == "class" and not colorbar_axes(fig)
    for ax in fig.axes:  # one scatter per class, the legend's order
        assert len(ax.collections) == len(entries)
        assert sum(len(c.get_offsets()) for c in ax.collections) == 24
        assert ax.get_title().endswith("features (24 points)") and "t-SNE" in ax.get_xlabel()
    assert entries == sorted(entries, key=int) and len(set(entries)) == len(entries)
    assert f"24 images of {len(entries)} classes" in fig.get_suptitle().replace("\n", " ")


def test_many_classes_get_a_colorbar_of_class_ids():
    labels = torch.arange(60).numpy() % 30
    fig = embedding_figure({"cls": torch.randn(60, 4)}, labels, "t-SNE")
    (bar_ax,) = colorbar_axes(fig)
    assert not fig.legends and bar_ax.get_ylabel() == "class id"
    assert (bar_ax._colorbar.norm.vmin, bar_ax._colorbar.norm.vmax) == (0, 29)


def test_analysis_run_folder_is_not_named_after_an_aggregator():
    """task=analyze reads no aggregator: neither its folder's name nor its hash names one."""
    from mim_agg.runs.identity import run_name

    names = {
        run_name(
            compose_config([*ANALYZE, f"aggregator={name}"]),
            {"backbone": "vit_tiny", "aggregator": name, "dataset": "digits"},
        )
        for name in ("cls", "abmilp")
    }
    (name,) = names
    assert name.startswith("analyze-vit_tiny-digits-")


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_backbone_without_cls_reports_patch_statistics(tmp_path):
    cfg = compose_config(
        [*ANALYZE, "backbone.arch=vit_base_patch16_gap_224", "analysis.embedding=[mean]"], tmp_path
    )
    result = run(cfg)
    assert set(result["stats"]) == {
        "patch_self_attn",
        "patch_self_attn_rel",
        "patch_patch_entropy",
        "patch_update_ratio",
    }
    assert (tmp_path / "run" / "embedding.png").is_file()


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_probe_checkpoint_adds_its_pooling_weights(tmp_path):
    run_probe(
        compose_config(
            [*FAST, "aggregator=abmilp", "probe.epochs=1", "backbone.img_size=64"],
            tmp_path / "probe",
        )
    )
    ckpt = tmp_path / "probe" / "run" / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        [*ANALYZE, "backbone.img_size=64", f"analysis.probe_ckpt={ckpt}"], tmp_path / "analysis"
    )
    from mim_agg.builders import load_probe_head
    from mim_agg.tasks.analyze import Collector

    backbone = FrozenBackbone(**backbone_arguments(cfg.backbone))
    head = load_probe_head(cfg, cfg.analysis.probe_ckpt, backbone.layout)
    selected = torch.load(ckpt, weights_only=True)["head_selection"]["abmilp"]["state"]
    torch.testing.assert_close(
        head.aggregator.scorer[0].weight, selected["aggregator.scorer.0.weight"]
    )
    collector = Collector(cfg, backbone, head)
    images = torch.randn(2, 3, 64, 64)
    with trace_blocks(backbone.model.blocks) as records:
        tokens = backbone(images)
        collector.add(images, torch.tensor([0, 1]), tokens, records)
    assert "probe: abmilp weights" in collector.maps
    assert collector.maps["probe: abmilp weights"][0].shape == (2, 4, 4)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_probe_checkpoint_of_other_tokens_or_crafted_is_refused(tmp_path):
    from mim_agg.builders import load_probe_head
    from mim_agg.errors import UserError

    run_probe(compose_config([*FAST, "aggregator=abmilp", "probe.epochs=1"], tmp_path / "probe"))
    ckpt = tmp_path / "probe" / "run" / "checkpoints" / "last.ckpt"
    other_block = compose_config(
        [*ANALYZE, "backbone.block=5", f"analysis.probe_ckpt={ckpt}"], tmp_path / "analysis"
    )
    with pytest.raises(UserError, match=r"trained on other tokens than these \(block: -1 vs 5\)"):
        layout = FrozenBackbone(**backbone_arguments(other_block.backbone)).layout
        load_probe_head(other_block, str(ckpt), layout)

    marker = tmp_path / "code_ran"

    class Crafted:
        def __reduce__(self):
            return (marker.touch, ())

    torch.save({"state_dict": Crafted()}, ckpt)  # pickles a call that would create `marker`
    cfg = compose_config([*ANALYZE, f"analysis.probe_ckpt={ckpt}"], tmp_path / "analysis")
    with pytest.raises(UserError, match="is not a plain tensor checkpoint"):
        load_probe_head(cfg, str(ckpt), FrozenBackbone(**backbone_arguments(cfg.backbone)).layout)
    assert not marker.exists()


@pytest.fixture
def analysis_sweep(tmp_path):
    """A sweep folder linking to two analysis run folders, MAE (MIM) and DINO (JEA), each
    with its resolved config.yaml and attention_stats.json."""
    sweep_dir = tmp_path / "multirun" / "sweep"
    sweep_dir.mkdir(parents=True)
    for number, (backbone, family) in enumerate((("mae_vitb", "mim"), ("dino_vitb", "jea"))):
        run_dir = tmp_path / "runs" / f"analyze-{backbone}-digits"
        run_dir.mkdir(parents=True)
        cfg = compose_config(["task=analyze", "dataset=digits", f"backbone={backbone}"], tmp_path)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        result = {
            "backbone": cfg.backbone.weights,
            "family": family,
            "num_images": 540,
            "max_entropy": math.log(196),
            "stats": {"cls_patch_entropy": [5.0, 5.2 - number], "patch_self_attn": [0.3, 0.2]},
            "per_head": {},
        }
        (run_dir / "attention_stats.json").write_text(json.dumps(result))
        (sweep_dir / f"{number}-{run_dir.name}").symlink_to(run_dir)
    return sweep_dir


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_compare_script_overlays_the_runs_of_a_sweep_folder(analysis_sweep):
    script = PROJECT_ROOT / "scripts" / "compare_attention.py"
    done = subprocess.run(
        [sys.executable, str(script), str(analysis_sweep)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (analysis_sweep / "attention_compare.png").stat().st_size > 5000
    assert "2 runs" in done.stdout


def test_compare_lines_are_labelled_by_the_config_values_that_differ(analysis_sweep, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "compare_attention", PROJECT_ROOT / "scripts" / "compare_attention.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    figures = []
    monkeypatch.setattr(script, "save_figure", lambda fig, path: figures.append(fig))
    monkeypatch.setattr(sys, "argv", ["compare_attention.py", str(analysis_sweep)])
    script.main()
    (fig,) = figures
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "backbone.weights=vit_base_patch16_224.dino (JEA)",
        "backbone.weights=vit_base_patch16_224.mae (MIM)",
        f"uniform over N = 196 patches: ln N = {math.log(196):.3f} nats",
    ]
    title = fig.get_suptitle().replace("\n", " ")
    for part in ("backbone.arch=vit_base_patch16_224", "dataset.name=digits", "analysis.split=val"):
        assert part in title
    assert "540 images" in title and "backbone.weights" not in title  # it differs: the legend


def test_compare_takes_a_relative_sweep_folder_from_the_project_root(
    analysis_sweep, monkeypatch, tmp_path
):
    """As the runs do: ``MIM_AGG_ROOT`` (or the current folder) is where ``outputs/`` is."""
    root = analysis_sweep.parent.parent
    monkeypatch.setenv("MIM_AGG_ROOT", str(root))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # anywhere but the root
    relative = analysis_sweep.relative_to(root)
    monkeypatch.setattr(sys, "argv", ["compare_attention.py", str(relative)])
    runpy.run_path(str(PROJECT_ROOT / "scripts" / "compare_attention.py"), run_name="__main__")
    assert (analysis_sweep / "attention_compare.png").is_file()


def test_blocks_other_than_timms_pre_norm_vit_blocks_are_refused_by_name():
    from torch import nn

    from mim_agg.analysis.tracing import trace_blocks
    from mim_agg.errors import ConfigError

    refused = pytest.raises(ConfigError, match="task=analyze reads .* blocks are Linears. Pick")
    with refused, trace_blocks(nn.ModuleList([nn.Linear(2, 2)])):
        pass
