"""efficient-probing's comparison: its fourteen poolers trained together (``heads=ep``)."""

import csv
import math

import pytest

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
