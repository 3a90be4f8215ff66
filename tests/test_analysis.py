"""The paper's attention diagnostics: exact statistics, streaming, figures, no-[cls] models."""

import json
import math
import pickle
import subprocess
import sys

import pytest
import torch

from mim_agg.analysis.statistics import (
    StatisticsAccumulator,
    attention_statistics,
    update_ratios,
)
from mim_agg.analysis.tracing import trace_blocks
from mim_agg.backbones import FrozenBackbone
from mim_agg.runs.runner import run_task as run
from mim_agg.runs.runner import run_task as run_probe
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
    tmp_path = tmp_path_factory.mktemp("analysis")
    return run(compose_config(ANALYZE, tmp_path)), tmp_path / "run"


def test_analyze_writes_stats_and_figures(analysis_run):
    result, output_dir = analysis_run
    saved = json.loads((output_dir / "attention_stats.json").read_text())
    assert saved["backbone"] == "vit_tiny_patch16_224" and saved["num_images"] == 24
    assert set(saved) == {"backbone", "family", "num_images", "max_entropy", "stats", "per_head"}
    assert saved["family"] == "none"  # from backbone.family, never guessed from a name
    assert all(len(values) == 12 for values in saved["stats"].values())
    for name in ("attention_stats.png", "attention_maps.png", "embedding.png"):
        data = (output_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


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

    backbone = FrozenBackbone(**cfg.backbone)
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


def test_probe_checkpoint_of_other_tokens_or_crafted_is_refused(tmp_path):
    from mim_agg.builders import load_probe_head
    from mim_agg.errors import UserError

    run_probe(compose_config([*FAST, "aggregator=abmilp", "probe.epochs=1"], tmp_path / "probe"))
    ckpt = tmp_path / "probe" / "run" / "checkpoints" / "last.ckpt"
    other_block = compose_config(
        [*ANALYZE, "backbone.block=5", f"analysis.probe_ckpt={ckpt}"], tmp_path / "analysis"
    )
    with pytest.raises(UserError, match=r"trained on other tokens than these \(block: -1 vs 5\)"):
        load_probe_head(other_block, str(ckpt), FrozenBackbone(**other_block.backbone).layout)

    marker = tmp_path / "code_ran"

    class Crafted:
        def __reduce__(self):
            return (marker.touch, ())

    torch.save({"state_dict": Crafted()}, ckpt)  # pickles a call that would create `marker`
    cfg = compose_config([*ANALYZE, f"analysis.probe_ckpt={ckpt}"], tmp_path / "analysis")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_probe_head(cfg, str(ckpt), FrozenBackbone(**cfg.backbone).layout)
    assert not marker.exists()


def test_compare_script_overlays_runs(tmp_path):
    for name, arch in (("0_mae", "vit_tiny_patch16_224"), ("1_dino", "vit_small_patch16_224")):
        folder = tmp_path / name
        folder.mkdir()
        result = {
            "backbone": f"{arch}.{name[2:]}",
            "num_images": 1,
            "max_entropy": 1.4,
            "stats": {"cls_patch_entropy": [1.0, 1.2], "patch_self_attn": [0.3, 0.2]},
            "per_head": {},
        }
        (folder / "attention_stats.json").write_text(json.dumps(result))
    script = PROJECT_ROOT / "scripts" / "compare_attention.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "attention_compare.png").stat().st_size > 5000
    assert "2 runs" in done.stdout
