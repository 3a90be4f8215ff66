"""efficient-probing's comparison: its fourteen poolers trained together (``heads=ep``)."""

import csv
import math

import pytest

from mim_agg.runs.identity import run_name
from mim_agg.runs.runner import run_task
from tests.helpers import FAST, compose_config

EP_POOLERS = {
    "abmilp", "simpool", "esimpool", "clip_pool", "siglip_pool", "aim_pool", "efficient_probe",
    "cbam_pool", "coca_pool", "cait_pool", "vit_block_pool", "jepa_pool", "dolg_pool", "cae_pool",
}  # fmt: skip


@pytest.mark.slow  # trains fifteen heads for real
def test_heads_ep_trains_the_linear_probe_and_all_fourteen_poolers_in_one_pass(tmp_path):
    cfg = compose_config([*FAST, "aggregator=cls", "heads=ep", "probe.epochs=1"], tmp_path)
    assert {cfg.heads[name].name for name in cfg.heads} == EP_POOLERS
    assert cfg.heads.abmilp.depth == 2 and cfg.heads.abmilp.self_attn == "both"
    summary = run_task(cfg)
    with open(tmp_path / "run" / "heads.csv") as handle:
        rows = {row["head"]: row for row in csv.DictReader(handle)}
    assert set(rows) == EP_POOLERS | {"cls"}
    assert all(math.isfinite(float(row["test/acc1"])) for row in rows.values())
    assert int(rows["cls"]["trainable_params"]) < int(rows["siglip_pool"]["trainable_params"])
    assert summary["winner"] in rows


# efficient-probing's results.csv (billpsomas/efficient-probing), the rows whose method and
# architecture have a config here: (family, method, arch, our config, lp_variant, ep_variant).
# Their lp_variant `pos` is the patch mean, ep_variant `ep_all` reads [cls] beside the patches;
# their RADIO `cls` is RADIO's summary, three teachers' tokens concatenated (their notes).
LEADERBOARD = [
    ("MIM", "MAE", "ViT-B/16", "mae_vitb", "cls", "ep"),
    ("MIM", "MAE", "ViT-L/16", "mae_vitl", "cls", "ep"),
    ("MIM", "BEiTv2", "ViT-B/16", "beitv2_vitb", "cls", "ep"),
    ("MIM", "SimMIM", "ViT-B/16", "simmim_vitb", "cls", "ep"),
    ("MIM", "CAPI", "ViT-L/14", "capi_vitl", "cls", "ep"),
    ("MIM", "EVA02", "ViT-L/14", "eva02_vitl_mim", "cls", "ep"),
    ("MIM", "Hiera", "ViT-B/16", "hiera_vitb_mae", "pos", "ep"),
    ("MIM", "Hiera", "ViT-L/16", "hiera_vitl_mae", "pos", "ep"),
    ("MIM", "Hiera", "ViT-H/16", "hiera_vith_mae", "pos", "ep"),
    ("JEA", "DINO", "ViT-B/16", "dino_vitb", "cls", "ep_all"),
    ("JEA", "I-JEPA", "ViT-H/14", "ijepa_vith", "pos", "ep"),
    ("JEA", "MoCov3", "ViT-B/16", "mocov3_vitb", "cls", "ep_all"),
    ("Hybrid", "iBOT", "ViT-B/16", "ibot_vitb", "cls", "ep_all"),
    ("Hybrid", "iBOT", "ViT-L/16", "ibot_vitl", "cls", "ep_all"),
    ("Hybrid", "DINOv2", "ViT-B/14", "dinov2_vitb", "cls", "ep"),
    ("Hybrid", "DINOv2", "ViT-L/14", "dinov2_vitl", "cls", "ep_all"),
    ("Hybrid", "Franca", "ViT-L/14", "franca_vitl14", "cls", "ep_all"),
    ("Hybrid", "RADIO", "ViT-B/16", "radiov25_vitb16", "summary", "ep"),
    ("Hybrid", "RADIO", "ViT-L/16", "radiov25_vitl16", "summary", "ep"),
    ("VLM", "CLIP", "ViT-B/16", "clip_vitb16", "cls", "ep_all"),
    ("VLM", "CLIP", "ViT-L/14", "clip_vitl14", "cls", "ep"),
    ("VLM", "SigLIP", "ViT-L/16", "siglip_vitl16_256", "pos", "ep"),
    ("VLM", "SigLIP2", "ViT-L/16", "siglip2_vitl16_256", "pos", "ep"),
    ("VLM", "SigLIP2", "SO400M/14", "siglip2_so400m14", "pos", "ep"),
    ("VLM", "PE-Core", "L-14/336", "pe_core_vitl14_336", "pos", "ep"),
    ("VLM", "EVA02-CLIP", "E-14", "eva02_clip_vite14", "cls", "ep"),
    ("VLM", "EVA02-CLIP", "E-14-plus", "eva02_clip_vite14_plus", "cls", "ep"),
    ("VLM", "MetaCLIP2", "ViT-bigG/14", "metaclip2_vitbigg14", "cls", "ep"),
    ("VLM", "MetaCLIP2", "ViT-bigG/14-378", "metaclip2_vitbigg14_378", "cls", "ep"),
    ("GEN", "AIMv2", "ViT-L/14", "aimv2_vitl14", "pos", "ep"),
]
LINEAR_INPUT = {"cls": "cls", "pos": "mean", "summary": "summary"}
EP_TOKENS = {"ep": "patch", "ep_all": "all"}
FAMILY = {"MIM": "mim", "JEA": "jea", "Hybrid": "hybrid", "VLM": "vlm", "GEN": "generative"}
# Where ours must differ, and why: their CAPI `cls` is CAPI's own pooled output (global_repr),
# which our CAPI (no [cls], the decoder not kept) does not have: the patch mean.
DIFFERS = {"capi_vitl": {"linear_input": "mean"}}
# The image size of the rows that are not ranked at 224 px (their results.csv image_size).
IMAGE_SIZE = {
    "siglip_vitl16_256": 256, "siglip2_vitl16_256": 256, "pe_core_vitl14_336": 336,
    "metaclip2_vitbigg14_378": 378,
}  # fmt: skip


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize(("family", "method", "arch", "name", "lp", "ep"), LEADERBOARD)
def test_backbone_configs_read_what_the_leaderboard_reads(
    family, method, arch, name, lp, ep, tmp_path
):
    backbone = compose_config([f"backbone={name}"], tmp_path).backbone
    expected = {"linear_input": LINEAR_INPUT[lp], "ep_tokens": EP_TOKENS[ep]}
    expected |= DIFFERS.get(name, {})
    assert {k: backbone[k] for k in expected} == expected, f"{method} {arch}"
    assert backbone.family == FAMILY[family]
    assert backbone.img_size == IMAGE_SIZE.get(name, 224)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_representation_that_reads_a_missing_cls_is_refused_by_name(tmp_path):
    from mim_agg.builders import backbone_layout
    from mim_agg.errors import ConfigError
    from mim_agg.validation import check_ranges

    for key, value in (("linear_input", "cls"), ("ep_tokens", "all")):
        cfg = compose_config(["backbone=siglip_vitb16", f"backbone.{key}={value}"], tmp_path)
        with pytest.raises(ConfigError, match=f"backbone.{key}={value} reads the .cls. token"):
            backbone_layout(cfg)
    cfg = compose_config(["backbone.linear_input=gap"], tmp_path)
    with pytest.raises(ConfigError, match="backbone.linear_input=gap is invalid: it must be cls"):
        check_ranges(cfg)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_ep_row_reads_the_backbones_representation_per_task(tmp_path):
    rows = (("dino_vitb", "cls", "all"), ("ijepa_vith", "mean", "patch"))
    for name, linear, tokens in (*rows, ("radiov25_vitb16", "summary", "patch")):
        probe = compose_config(["experiment=ep_row", f"backbone={name}", "task=probe"], tmp_path)
        assert probe.aggregator.name == linear
        assert dict(probe.heads.efficient_probe) == {
            "name": "efficient_probe", "num_queries": 32, "d_out": 1, "tokens": tokens,
        }  # fmt: skip
        assert (probe.probe.optimizer, probe.probe.blr, probe.probe.epochs) == ("lars", 0.1, 90)
        assert probe.probe.effective_batch == 4096 and probe.probe.features == "cached"
        knn = compose_config(["experiment=ep_row", f"backbone={name}", "task=knn"], tmp_path)
        assert knn.aggregator.name == linear and not knn.heads  # k-NN trains nothing
        choices = {"backbone": name, "aggregator": "cls", "dataset": "imagenet"}  # the default
        assert run_name(knn, choices).startswith(f"knn-{name}-{linear}-imagenet-")
        assert list(knn.knn.k) == [5, 10, 15, 20, 50, 100, 200]
        assert list(knn.knn.temperatures) == [0.07, 0.1, 0.2]


@pytest.mark.slow  # two jobs of a sweep, a tiny ViT on digits (~40 s)
def test_experiment_ep_row_runs_end_to_end_and_writes_the_row(tmp_path):
    """A RADIO-shaped tiny ViT (a [cls] and 3 more prefix tokens, the first 2 its summary):
    LP and k-NN read the summary from the one cache both jobs share."""
    from tests.helpers import run_cli

    radio = ["+backbone.arch_kwargs.reg_tokens=3", "backbone.summary_tokens=2"]
    radio.append("backbone.linear_input=summary")
    result = run_cli("experiment=ep_row", "debug=fast", "dataset=digits", *radio, root=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    with open(sweep / "results_row.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["backbone"], row["family"], row["dataset"]) == ("vit_tiny", "none", "digits")
    assert all(0 <= float(row[c]) <= 100 for c in ("k-NN", "LP", "EP"))
    for probe in ("LP", "EP"):  # the test split's best epoch is at least the held-out choice's
        assert float(row[f"{probe} (best epoch on test)"]) >= float(row[probe])
    assert row["linear_input"] == "summary"
    (knn,) = (tmp_path / "outputs" / "runs").glob("knn-*/heads.csv")
    with open(knn) as handle:
        assert {line["head"] for line in csv.DictReader(handle)} >= {"summary"}
    assert "| backbone | family | dataset | k-NN | LP | EP |" in result.stdout
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one extraction served both jobs
