"""The GPU check runs on a CPU in its smoke mode, so it works when a GPU is finally at hand."""

import json
import subprocess
import sys

import pytest

from tests.helpers import PROJECT_ROOT, cli_environment


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / "gpu_check.py"), "--smoke"]
    command += ["--seconds", "0.2", "--out", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=cli_environment(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["throughput"]["extract_images_per_s"] > 0
    assert report["throughput"]["cached_probe_abmilp_images_per_s"] > 0
    decoding = report["jpeg_decode"]  # batched decode_jpeg and dataset.decode=gpu, on the CPU
    assert decoding["decode_images_per_s"] > 0
    assert set(decoding["loaders"]) == {"eval_pil", "train_pil", "eval_gpu", "train_gpu"}
    assert all(rate > 0 for rate in decoding["loaders"].values())
    assert set(decoding["gpu_over_pil"]) == {"eval", "train"}
    difference = decoding["difference"]  # on the CPU the device's decoding is libjpeg-turbo's
    assert difference["decode_device_vs_cpu"]["max"] == 0
    assert difference["eval_gpu_device_vs_cpu"]["max"] == 0
    assert 0 < difference["eval_gpu_device_vs_pil"]["mean"] < 1
    assert all(kind["decoded"] for kind in decoding["kinds"].values())
    # heads=ep from cached tokens through probe.effective_batch: linear probe + 14 poolers
    memory = report["ep_memory"]
    assert memory["heads"] == 15 and memory["effective_batch"] == 8 * 2
    assert "note" in memory and "peak_allocated_gb" not in memory  # measured on a GPU alone
    for features in ("online", "cached"):  # each its own CPU run (on a GPU, against the CPU's)
        run = report["end_to_end"][f"bench8_{features}"]
        assert len(run["cpu_fp32_test_acc1"]) == 8 and run["within_tolerance"]
        assert run["bf16_largest_gap_to_cpu"] == run["fp32_largest_gap_to_cpu"] == 0
    counted = report["extraction_memory"]["rows"]["vit_tiny"]  # the README's memory table's count
    assert counted["reading_attention"]["count_gb"] > counted["plain"]["count_gb"] > 0
    assert "peak_gb" not in counted["plain"]  # measured on a GPU alone
    distributed = report["distributed_extraction"]  # trainer=ddp_sim against trainer=cpu
    # plan, manifest and 9 shards of 16 images: 96 split into train and held-out, 32 test
    assert distributed["processes"] == 2 and distributed["files_compared"] == 2 + 9
    assert distributed["identical"] and distributed["differing_files"] == []
