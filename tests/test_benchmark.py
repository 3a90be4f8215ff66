"""The benchmark script runs end to end and writes its JSON. Timings are not asserted (they vary
with the machine's load), only what is deterministic: every figure is present, finite and
positive, the ratios are the quotients of their timings, and the counted sizes."""

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import PROJECT_ROOT

EP_POOLERS = {
    "abmilp", "simpool", "esimpool", "clip_pool", "siglip_pool", "aim_pool", "efficient_probe",
    "cbam_pool", "coca_pool", "cait_pool", "vit_block_pool", "jepa_pool", "dolg_pool", "cae_pool",
}  # fmt: skip


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(PROJECT_ROOT / "scripts" / "benchmark.py"),
        "--out",
        str(out),
        "--arch",
        "vit_tiny_patch16_224",
        "--img-size",
        "64",
        "--classes",
        "2",
        "--batch-size",
        "16",
        "--head-seconds",
        "0.01",
        "--repeats",
        "1",
        "--extract-images",
        "8",
        "--read-images",
        "64",
        "--memory-batch",
        "4",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    timings = (
        "single_head_s", "bench8_s", "all_heads_s", "all_heads_without_oracle_s",
        "single_head_cached_s", "all_poolers_s", "online_train_images_per_s",
        "cached_train_images_per_s", "cache_read_bytes_per_s", "raw_read_bytes_per_s",
    )  # fmt: skip
    for key in timings:
        assert positive(report[key]), key
    ratios = {
        "multihead_ratio": ("bench8_s", "single_head_s"),
        "all_heads_ratio": ("all_heads_s", "single_head_s"),
        "all_heads_without_oracle_ratio": ("all_heads_without_oracle_s", "single_head_s"),
        "all_poolers_ratio": ("all_poolers_s", "single_head_cached_s"),
        "cached_epoch_speedup": ("cached_train_images_per_s", "online_train_images_per_s"),
        "cache_read_ratio": ("cache_read_bytes_per_s", "raw_read_bytes_per_s"),
    }
    for ratio, (numerator, denominator) in ratios.items():
        assert report[ratio] == pytest.approx(report[numerator] / report[denominator]), ratio
    assert report["num_all_heads"] == len(report["aggregators"]) >= 14
    for row in report["aggregators"].values():
        assert positive(row["head_images_per_s"]) and row["trainable_params"] >= 0
    assert report["aggregators"]["abmilp"]["trainable_params"] == (192 + 1) + (192 * 2 + 2)
    assert report["cache_bytes_per_image"] == pytest.approx(17 * 192 * 2, rel=0.1)  # bf16 tokens
    assert set(report["extract_overhead"]) == {"fp32", "bf16"}
    assert all(positive(v) for v in report["extract_overhead"].values())

    ep = report["ep_poolers"]
    assert ep["batch"] == 4 and set(ep["poolers"]) == EP_POOLERS
    for name, row in ep["poolers"].items():
        assert positive(row["trainable_params"]), name
        # weights, gradients and momentum (fp32) and the 4 x 17 x 192 fp32 input tokens at least
        floor = 12 * row["trainable_params"] + 4 * 17 * 192 * 4
        assert row["tensor_bytes"] >= floor and row["saved_for_backward_bytes"] >= 0, name
        assert ("peak_bytes" in row) == (not ep["device"].startswith("cpu")), name  # CUDA alone
    memory = report["ep_memory"]
    assert "skipped" in memory or positive(memory["peak_allocated_gb"])
    assert "all_poolers_ratio" in result.stdout and "extraction overhead" in result.stdout
