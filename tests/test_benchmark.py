"""The benchmark script runs end to end and writes its JSON (timings are not asserted)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import PROJECT_ROOT


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
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["multihead_ratio"] == pytest.approx(report["bench8_s"] / report["single_head_s"])
    assert report["num_all_heads"] == len(report["aggregators"]) >= 14
    assert report["all_heads_without_oracle_s"] > 0
    assert report["aggregators"]["abmilp"]["trainable_params"] == (192 + 1) + (192 * 2 + 2)
    assert report["cached_epoch_speedup"] == pytest.approx(
        report["cached_train_images_per_s"] / report["online_train_images_per_s"]
    )
    assert report["cache_bytes_per_image"] == pytest.approx(17 * 192 * 2, rel=0.1)  # bf16 tokens
    assert report["cached_train_images_per_s"] > 0 and report["online_train_images_per_s"] > 0
    assert report["cache_read_ratio"] > 0
    assert set(report["extract_overhead"]) == {"fp32", "bf16"}
    assert "ratio" in result.stdout and "extraction overhead" in result.stdout
