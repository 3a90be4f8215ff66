"""The benchmark script runs end to end and writes its JSON. Timings are not asserted (they vary
with the machine's load), only what is deterministic: every figure is present, finite and
positive, the ratios are the quotients of their timings, and the counted sizes."""

import importlib.util
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
        "--data-images",
        "2",
        "--data-workers",
        "1",
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
    assert all(positive(rate) for rate in report["data_path"]["eval_per_core"].values())
    assert "data path: images/s per CPU core" in result.stdout


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # decodes, loads through worker processes and runs a ViT for seconds
def test_the_data_path_alone_reports_every_decoder_per_core(tmp_path, monkeypatch, capsys):
    """``--data-path-only``: per-core rates of every decoder for decoding alone, the eval and
    training items and the loaders, on ImageNet-sized JPEGs of ImageNet's file size (under gpu
    the workers' share, and the device's share on a CPU core); turbo changes no pixel,
    turbo_dct some (as bilinear resizing does: the yardstick), gpu less than bilinear."""
    pytest.importorskip("simplejpeg")
    out = tmp_path / "data.json"
    arguments = ["--out", str(out), "--data-path-only", "--data-images", "4"]
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *arguments, "--data-workers", "1"])
    load_script("benchmark").main()
    report = json.loads(out.read_text())
    assert set(report) == {"setup", "data_path"}
    data = report["data_path"]
    images = data["images"]
    assert images["count"] == 4 and images["size"] == [500, 375] and images["large_count"] == 2
    assert 90e3 < images["mean_bytes"] < 160e3  # ImageNet's files: 107 KB on average
    decoders = {"pil", "turbo", "turbo_dct"}
    assert set(data["decode_per_core"]) == decoders | {"torchvision"}
    for figure in ("decode_per_core", "eval_per_core", "train_per_core", "eval_large_per_core"):
        assert decoders <= set(data[figure]), figure
        assert all(positive(rate) for rate in data[figure].values()), figure
        assert ("gpu" in data[figure]) == (figure != "decode_per_core"), figure  # the device's
    assert set(data["gpu_finish_on_cpu"]) == {"eval", "train"}
    assert all(positive(rate) for rate in data["gpu_finish_on_cpu"].values())
    for split in ("eval", "train"):
        for decode in decoders | {"gpu"}:
            assert all(positive(v) for v in data["loader"][f"{split}_{decode}"].values())
    for images, figures in data["difference"].items():
        assert set(figures) == {"turbo", "turbo_dct", "gpu", "pil_bilinear"}, images
        bilinear = figures["pil_bilinear"]["pixel_mean_abs_levels"]
        assert 0 < figures["gpu"]["pixel_mean_abs_levels"] < bilinear, images
        assert 0.99 < figures["gpu"]["cls_cosine_min"] <= 1, images
        same = figures["turbo"]
        assert same["pixel_max_abs_levels"] == 0 and same["cls_cosine_min"] == pytest.approx(1)
        for other in ("turbo_dct", "pil_bilinear"):
            assert figures[other]["pixel_mean_abs_levels"] > 0, (images, other)
            assert 0.9 < figures[other]["cls_cosine_min"] < 1, (images, other)
    assert len(data["load_average"]["before"]) == 3 and data["cpu_count"] >= 1
    assert "data path: images/s per CPU core" in capsys.readouterr().out


@pytest.mark.parametrize("argument", ["--classes=0", "--repeats=-1", "--head-seconds=inf"])
def test_a_count_or_duration_out_of_range_is_refused_by_argparse(argument, monkeypatch, capsys):
    import runpy

    script = runpy.run_path(str(PROJECT_ROOT / "scripts" / "benchmark.py"))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--out", "x.json", argument])
    with pytest.raises(SystemExit) as refused:
        script["parse_args"]()
    assert refused.value.code == 2
    assert f"argument {argument.split('=')[0]}: " in capsys.readouterr().err
