"""``task=evaluate``: a finished probe run scored on fake copies of ImageNet-V2, -Sketch, -R, -A
and -ReaL in their archives' layouts, each accuracy against an independent computation from
the heads' logits (restricted argmax for -R/-A, set membership for ReaL)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from scipy.stats import binomtest

from mim_agg.backbones.loading import read_run_checkpoint
from mim_agg.builders import build_datamodule, build_probe
from mim_agg.data.imagenet_variants import (
    imagenet_a,
    imagenet_r,
    imagenet_real,
    imagenet_wnids,
    official_wnids,
)
from mim_agg.data.sources import DataError
from mim_agg.errors import UserError
from mim_agg.report.significance import bootstrap_interval
from mim_agg.runs.runner import run_task
from mim_agg.tasks.probe import CLASSES
from mim_agg.utils.files import DamagedFile
from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import read_predictions
from tests.helpers import CONFIG_DIR, FAST, compose_config, run_cli
from tests.test_report import fake_sweep

INDICES = [6, 7, 11, 999]  # the probe's 4 classes, by ImageNet-1k index: 6 and 11 are
WNIDS = [imagenet_wnids()[i] for i in INDICES]  # classes of ImageNet-R and -A, 7 and 999 not
OTHER = 5  # an ImageNet class the probe lacks: its images are left out


def jpeg(path, label: int, index: int) -> None:
    """A 32 px image whose colour says its class, with a little noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1000 * label + index)
    colour = np.array([60 * (label % 4), 255 - 50 * label % 255, 40 * index % 255])
    pixels = np.clip(colour + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A two-head probe trained on 4 wnid folders (ImageNet's layout), and its wnid list."""
    root = tmp_path_factory.mktemp("evaluate")
    imagenet = root / "imagenet"
    for label, wnid in enumerate(WNIDS):
        for i in range(8):
            jpeg(imagenet / "train" / wnid / f"{wnid}_{i}.JPEG", label, i)
        for i in range(2):  # ILSVRC2012_val_<n>: n = 2 * label + i + 1 (ReaL reads them too)
            jpeg(imagenet / "val" / wnid / f"ILSVRC2012_val_{2 * label + i + 1:08d}.JPEG", label, i)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    overrides = [
        *FAST,
        "dataset=image_folder",
        f"dataset.root={imagenet}",
        "dataset.num_workers=0",
        "aggregator=mean",
        "+aggregator@heads.abmilp=abmilp",
    ]
    run_task(compose_config(overrides, root))
    return root


def official_copy(folder, name: str, images: dict[str, list[tuple[str, int, int]]]) -> None:
    """``name``'s (``imagenet_r``, ``imagenet_a``) 200 class folders as its archive has them,
    each with images: ``images[wnid]``'s ``(file name, colour label, index)``, one filler
    image in the others (classes the probe lacks: left out, never decoded)."""
    filler = folder.parent / f".{folder.name}-filler.jpg"
    jpeg(filler, 0, 0)
    for wnid in official_wnids(name):
        if wnid in images:
            for file, label, index in images[wnid]:
                jpeg(folder / wnid / file, label, index)
        else:
            (folder / wnid).mkdir(parents=True)
            shutil.copyfile(filler, folder / wnid / "filler.jpg")


def evaluate(
    probe_run, dataset: str, *overrides: str, wnids: str = "wnids.txt", run="run", again=True
) -> dict:
    """``task=evaluate`` of the fixture's run (or the run folder ``run`` under it); ``again``:
    with resume=false, replacing what another test scored on the same set."""
    command = [
        *FAST,
        "task=evaluate",
        f"evaluate.run={probe_run / run}",
        f"dataset={dataset}",
        f"dataset.wnids={probe_run / wnids}",
        "dataset.num_workers=0",
        *(["resume=false"] if again else []),
        *overrides,
    ]
    return run_task(compose_config(command, probe_run / "evaluating"))


def sketches(folder, shift: int = 0):
    """An ImageNet-Sketch copy of the probe's 4 classes, 2 images each."""
    for label, wnid in enumerate(WNIDS):
        for i in range(2):
            jpeg(folder / wnid / f"{i}.JPEG", label, i + shift)
    return folder


def logits_of(probe_run, files) -> dict[str, np.ndarray]:
    """Every head's logits on ``files``, computed here: the run's backbone and heads built
    from its config, each head's held-out-selected weights loaded from the checkpoint."""
    run_dir = probe_run / "run"
    trained = OmegaConf.load(run_dir / "config.yaml")
    model = build_probe(trained, 4).eval()
    state = read_run_checkpoint(run_dir / "checkpoints" / "last.ckpt", "", ("head_selection",))
    transform = build_datamodule(trained).eval_transform
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        tokens = model.source(images)
        out = {}
        for name, head in model.heads.items():
            head.load_state_dict(state["head_selection"][name]["state"])
            out[name] = head.eval()(tokens).numpy()
    return out


def check(result: dict, expected: dict[str, float]) -> None:
    assert set(result["heads"]) == set(expected) == {"mean", "abmilp"}
    for name, accuracy in expected.items():
        assert result["heads"][name]["test/acc1"] == pytest.approx(accuracy, abs=1e-9), name


@pytest.mark.slow  # trains a probe for seconds
def test_v2_sketch_r_a_score_the_probe_s_classes_r_and_a_restricted(probe_run, tmp_path):
    v2 = tmp_path / "v2" / "imagenetv2-top-images-format-val"
    sketch = tmp_path / "sketch"
    folders = {"r": tmp_path / "imagenet-r", "a": tmp_path / "imagenet-a"}
    files = {"v2": [], "sketch": [], "r": [], "a": []}  # (file, probe label)
    for label, index in enumerate(INDICES):
        for i in range(2):
            path = v2 / str(index) / f"{i}.jpeg"
            jpeg(path, label, i + 5)
            files["v2"].append((path, label))
            path = sketch / WNIDS[label] / f"{i}.JPEG"
            jpeg(path, (label + 1) % 4, i)  # sketches look like another class
            files["sketch"].append((path, label))
    jpeg(v2 / str(OTHER) / "x.jpeg", 0, 0)  # classes the probe lacks: left out
    jpeg(sketch / imagenet_wnids()[OTHER] / "x.JPEG", 0, 0)
    for key, shift in (("r", 1), ("a", 2)):  # 2 of the probe's classes are -R's and -A's
        ours = {
            WNIDS[label]: [(f"{i}.jpg", label + shift, i) for i in range(2)] for label in (0, 2)
        }
        official_copy(folders[key], f"imagenet_{key}", ours)
        files[key] = [(folders[key] / WNIDS[j] / f"{i}.jpg", j) for j in (0, 2) for i in range(2)]

    for key, dataset, overrides in (
        ("v2", "imagenet_v2", [f"dataset.root={tmp_path / 'v2'}", "dataset.variant=top-images"]),
        ("sketch", "imagenet_sketch", [f"dataset.root={sketch}"]),
        ("r", "imagenet_r", [f"dataset.root={folders['r']}"]),
        ("a", "imagenet_a", [f"dataset.root={folders['a']}"]),
    ):
        listed = files[key]
        labels = np.array([label for _, label in listed])
        logits = logits_of(probe_run, [path for path, _ in listed])
        scored = [0, 2] if key in ("r", "a") else [0, 1, 2, 3]
        expected = {
            name: float(np.mean(np.array(scored)[z[:, scored].argmax(1)] == labels))
            for name, z in logits.items()
        }
        result = evaluate(probe_run, dataset, *overrides)
        check(result, expected)
        assert result["images"] == len(listed) and result["scored_classes"] == len(scored)
        folder = probe_run / "run" / "evaluate" / result["dataset"]
        assert json.loads((folder / "metrics.json").read_text())["heads"] == result["heads"]
        predictions = read_predictions(folder / "predictions.safetensors")
        assert predictions.accuracy("abmilp") == pytest.approx(expected["abmilp"])
    assert result["dataset"] == "imagenet_a"
    # The run's own results stand beside them, untouched.
    assert json.loads((probe_run / "run" / "metrics.json").read_text())["winner"] in expected


@pytest.mark.slow  # trains a probe for seconds
def test_real_counts_a_prediction_in_the_label_set_and_skips_images_without_one(probe_run):
    imagenet = probe_run / "imagenet"
    real = [[0, 1], [INDICES[0]], [], [OTHER], [INDICES[1], INDICES[2]], [INDICES[1]]]
    real += [[INDICES[2], INDICES[3]], [INDICES[2]], [INDICES[3]]]  # images 1..8 (and a spare)
    real[0] = [INDICES[0], INDICES[3]]
    (imagenet / "real.json").write_text(json.dumps(real))
    files = sorted((imagenet / "val").rglob("*.JPEG"), key=lambda p: p.name)
    numbers = [int(p.stem[-8:]) for p in files]
    sets = {n: {INDICES.index(i) for i in real[n - 1] if i in INDICES} for n in numbers}
    kept = [(f, n) for f, n in zip(files, numbers, strict=True) if sets[n]]
    assert len(kept) == 6  # image 3 has no label, image 4 only one the probe lacks
    logits = logits_of(probe_run, [f for f, _ in kept])
    expected = {
        name: float(np.mean([p in sets[n] for p, (_, n) in zip(z.argmax(1), kept, strict=True)]))
        for name, z in logits.items()
    }
    result = evaluate(probe_run, "imagenet_real", f"dataset.root={imagenet}")
    check(result, expected)
    assert result["images"] == 6 and result["heads"]["mean"]["test/acc5"] is None
    # Per image, right or wrong by the label set: what the paired tests read.
    stored = read_predictions(probe_run / "run" / "evaluate" / "imagenet_real" / PREDICTIONS)
    for name, z in logits.items():
        right = [p in sets[n] for p, (_, n) in zip(z.argmax(1), kept, strict=True)]
        assert stored.correct(name).tolist() == right, name


@pytest.mark.slow  # trains a probe for seconds
def test_an_unfinished_run_or_other_classes_are_refused(probe_run, tmp_path):
    with pytest.raises(UserError, match="is no finished run"):
        run_task(
            compose_config(
                [*FAST, "task=evaluate", f"evaluate.run={tmp_path}", "dataset=imagenet_r"],
                tmp_path / "x",
            )
        )
    for folder, refusal in [("nope", "nope' does not exist"), ("sweep", "is a sweep folder")]:
        (tmp_path / "sweep").mkdir(exist_ok=True)
        (tmp_path / "sweep" / "multirun.yaml").touch()
        with pytest.raises(UserError, match=refusal):
            command = [*FAST, "task=evaluate", f"evaluate.run={tmp_path / folder}"]
            run_task(compose_config([*command, "dataset=imagenet_r"], tmp_path / "x"))
    (tmp_path / "three.txt").write_text("\n".join(WNIDS[:3]))
    root = f"dataset.root={sketches(tmp_path / 'sketch')}"
    with pytest.raises(UserError, match="predicts 4 classes .* lists 3, not the same"):
        evaluate(probe_run, "imagenet_sketch", root, wnids=str(tmp_path / "three.txt"))


@pytest.mark.slow  # trains a probe for seconds
def test_the_run_s_recorded_classes_decide_even_without_its_training_folders(probe_run, tmp_path):
    """Reversed wnids would score every head wrongly (0.0 for 0.667): refused by the run's own
    record of its classes, also once the folders it trained on are gone or when it trained on
    a split file; a run older than the record is refused where its folders are gone."""
    run_dir = shutil.copytree(probe_run / "run", tmp_path / "run")
    assert json.loads((run_dir / CLASSES).read_text()) == {"classes": WNIDS}
    (tmp_path / "reversed.txt").write_text("\n".join(reversed(WNIDS)))
    (tmp_path / "wnids.txt").write_text("\n".join(WNIDS))
    root = f"dataset.root={sketches(tmp_path / 'sketch')}"
    with pytest.raises(UserError, match=f"0: {WNIDS[0]} vs {WNIDS[3]}"):
        evaluate(tmp_path, "imagenet_sketch", root, wnids="reversed.txt")
    config = OmegaConf.load(run_dir / "config.yaml")
    config.dataset.root = str(tmp_path / "gone")  # the training folders are no more
    OmegaConf.save(config, run_dir / "config.yaml")
    with pytest.raises(UserError, match="not the same in the same order"):
        evaluate(tmp_path, "imagenet_sketch", root, wnids="reversed.txt")
    assert evaluate(tmp_path, "imagenet_sketch", root)["images"] == 8  # the right order scores

    (run_dir / CLASSES).write_text('{"classes": null}')  # labels of a split file: no names
    with pytest.raises(UserError, match="labels without class names .* set dataset.wnids"):
        evaluate(tmp_path, "imagenet_sketch", root, "dataset.wnids=null")
    (run_dir / CLASSES).unlink()  # a run from before the record, its folders gone
    with pytest.raises(UserError, match=r"records no class names \(classes.json.* are gone"):
        evaluate(tmp_path, "imagenet_sketch", root, wnids="reversed.txt")


@pytest.mark.slow  # trains a probe for seconds
def test_results_of_another_dataset_config_are_replaced_only_with_resume_false(probe_run, tmp_path):
    """Another copy (root), decoder or class list scored into the same folder: refused unless
    resume=false, and metrics.json records what was scored."""
    first, second = sketches(tmp_path / "one"), sketches(tmp_path / "two", shift=4)
    evaluate(probe_run, "imagenet_sketch", f"dataset.root={first}")
    metrics = probe_run / "run" / "evaluate" / "imagenet_sketch" / "metrics.json"
    recorded = json.loads(metrics.read_text())["dataset_config"]
    assert recorded["root"] == str(first) and recorded["images"] == 8
    assert recorded["decode"] == "pil" and recorded["wnids"] == str(probe_run / "wnids.txt")
    for change in (f"dataset.root={second}", "dataset.decode=turbo"):
        with pytest.raises(UserError, match=r"another dataset config \(differing: (root|decode)"):
            evaluate(probe_run, "imagenet_sketch", f"dataset.root={first}", change, again=False)
    assert json.loads(metrics.read_text())["dataset_config"] == recorded  # untouched
    evaluate(probe_run, "imagenet_sketch", f"dataset.root={second}")  # resume=false
    assert json.loads(metrics.read_text())["dataset_config"]["root"] == str(second)
    evaluate(probe_run, "imagenet_sketch", f"dataset.root={second}", again=False)  # the same


@pytest.mark.slow  # trains a probe for seconds
def test_a_set_scored_under_gpu_decoding_predicts_as_under_pil(probe_run, tmp_path):
    """task=evaluate finishes its batches on the device in its own loop (``finish_images``):
    on these images every head predicts as under pil, and the decoder is recorded."""
    root = f"dataset.root={sketches(tmp_path / 'sketch')}"
    folder = probe_run / "run" / "evaluate" / "imagenet_sketch"
    pil = evaluate(probe_run, "imagenet_sketch", root)
    predicted = read_predictions(folder / PREDICTIONS)
    gpu = evaluate(probe_run, "imagenet_sketch", root, "dataset.decode=gpu")
    assert json.loads((folder / "metrics.json").read_text())["dataset_config"]["decode"] == "gpu"
    assert gpu["heads"] == pil["heads"]
    for name in pil["heads"]:
        assert read_predictions(folder / PREDICTIONS).correct(name).tolist() == (
            predicted.correct(name).tolist()
        )


def test_imagenet_r_and_a_must_be_their_archive_s_200_class_folders(tmp_path):
    """A copy with 1 of its 200 classes would score that class alone; ImageNet-R's folder
    given as ImageNet-A would score the wrong classes: both refused, naming the folders."""
    rendition = tmp_path / "imagenet-r"
    official_copy(rendition, "imagenet_r", {})
    assert len(official_wnids("imagenet_r")) == len(set(official_wnids("imagenet_a"))) == 200
    images, wnids = imagenet_r(None, 0, root=str(rendition), wnids=None)[1], imagenet_wnids()
    assert len(images) == 200
    assert images.scored_classes == [wnids.index(w) for w in official_wnids("imagenet_r")]
    a_only = sorted(set(official_wnids("imagenet_a")) - set(official_wnids("imagenet_r")))
    with pytest.raises(DataError, match=f"missing: {a_only[0]}.*not of imagenet_a: n01443537"):
        imagenet_a(None, 0, root=str(rendition), wnids=None)
    partial = tmp_path / "partial"
    jpeg(partial / official_wnids("imagenet_r")[0] / "a.jpg", 0, 0)
    with pytest.raises(DataError, match=r"missing: n01484850, .* \(194 more\)"):
        imagenet_r(None, 0, root=str(partial), wnids=None)
    for image in (rendition / official_wnids("imagenet_r")[5]).iterdir():
        image.unlink()  # an empty class folder: no archive has one
    with pytest.raises(DataError, match=f"without images: {official_wnids('imagenet_r')[5]}"):
        imagenet_r(None, 0, root=str(rendition), wnids=None)


def test_a_real_json_of_another_format_is_named(tmp_path):
    jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 0, 0)
    for content in ('{"a": 1}', "[[1, 2], [1000]]", '[["n01440764"]]'):
        (tmp_path / "real.json").write_text(content)
        with pytest.raises(DataError, match=f"{tmp_path / 'real.json'} is no ReaL label file"):
            imagenet_real(None, 0, root=str(tmp_path))


def test_another_task_s_run_is_named_before_its_status(tmp_path):
    OmegaConf.save(OmegaConf.create({"task": "logreg"}), tmp_path / "config.yaml")
    (tmp_path / "run.json").write_text('{"status": "done"}')
    command = [*FAST, "task=evaluate", f"evaluate.run={tmp_path}", "dataset=imagenet_r"]
    with pytest.raises(UserError, match="is a task=logreg run; task=evaluate scores .* probe"):
        run_task(compose_config(command, tmp_path / "x"))


def test_a_damaged_predictions_file_says_which_command_writes_it_again(tmp_path):
    """A run's own file is written by training that run again; evaluate's by scoring again."""
    run_dir, scored = tmp_path / "run", tmp_path / "run" / "evaluate" / "imagenet_r"
    scored.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"status": "done"}')
    for folder, fix in (
        (run_dir, "train that run again .*resume=false"),
        (scored, "score the set again .*task=evaluate"),
    ):
        (folder / PREDICTIONS).write_bytes(b"<html>not found</html>")
        with pytest.raises(DamagedFile, match=f"is damaged .* or {fix}"):
            read_predictions(folder / PREDICTIONS)


@pytest.mark.slow  # trains a probe for seconds
def test_the_report_shows_each_set_beside_the_test_split_and_refuses_stale_results(
    probe_run, tmp_path
):
    """A one-job sweep of the run: results.md's section and results_evaluate.csv give the
    held-out-chosen heads' accuracies as evaluate wrote them, one seed's with the bootstrap
    interval over the images of the predictions file beside them (none without that file); a
    run trained again since (its last.ckpt changed) or a number that is no accuracy is
    refused."""
    sketch = sketches(tmp_path / "sketch", shift=3)
    scored = evaluate(probe_run, "imagenet_sketch", f"dataset.root={sketch}")["heads"]
    run_dir = shutil.copytree(probe_run / "run", tmp_path / "runs" / "probe-vit_tiny-x")
    sweep = fake_sweep(tmp_path, [])
    (sweep / f"0-{run_dir.name}").symlink_to(run_dir)
    report = compose_config(["task=report", f"report.sweep_dir={sweep}"])
    run_task(report)

    columns, rows = evaluated_section(sweep)
    assert columns[:3] == ["head", "column", "test"] and "imagenet_sketch" in columns
    with open(run_dir / "heads.csv") as handle:
        test = {row["head"]: float(row["test/acc1"]) for row in csv.DictReader(handle)}
    own = read_predictions(run_dir / PREDICTIONS)
    sketch_file = run_dir / "evaluate" / "imagenet_sketch" / PREDICTIONS
    on_sketch = read_predictions(sketch_file)
    marks = winner_and_same(sweep / "results.md", "test")
    assert marks == winner_and_same(sweep / "results.md", "imagenet_sketch", on_sketch)
    for head in ("mean", "abmilp"):  # one learning rate, one seed: each head is its row's
        row = dict(zip(columns, rows[head], strict=True))
        mark = marks[head]
        assert row["test"] == f"{100 * test[head]:.2f} {bracket(own.correct(head))} (1){mark}"
        sketch = f"{100 * scored[head]['test/acc1']:.2f}"
        on_set = f"{sketch} {bracket(on_sketch.correct(head))} (1){mark}"
        assert row["imagenet_sketch"] == on_set
    with open(sweep / "significance_evaluate.csv") as handle:  # the run may hold other sets
        (tested,) = [row for row in csv.DictReader(handle) if row["set"] == "imagenet_sketch"]
    assert tested["winner"] == winner_of(run_dir)
    with open(sweep / "results_evaluate.csv") as handle:
        rows = {row["head"]: row for row in csv.DictReader(handle)}
    assert {h: float(r["imagenet_sketch/acc1"]) for h, r in rows.items()} == {
        h: pytest.approx(v["test/acc1"]) for h, v in scored.items()
    }
    assert all(row["selected"] == "True" for row in rows.values())

    sketch_file.unlink()  # scored before evaluate wrote predictions: no bracket, no error
    run_task(report)
    columns, rows = evaluated_section(sweep)
    unbracketed = f"{100 * scored['mean']['test/acc1']:.2f} (1)"
    assert dict(zip(columns, rows["mean"], strict=True))["imagenet_sketch"] == unbracketed

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    original = checkpoint.read_bytes()
    checkpoint.write_bytes(original + b"\0")  # the run trained again: another checkpoint
    with pytest.raises(UserError, match=r"/evaluate/[^/]+/metrics.json is stale: it scored a"):
        run_task(report)
    checkpoint.write_bytes(original)
    metrics = run_dir / "evaluate" / "imagenet_sketch" / "metrics.json"
    summary = json.loads(metrics.read_text())
    summary["heads"]["abmilp"]["test/acc1"] = float("nan")
    metrics.write_text(json.dumps(summary))
    with pytest.raises(UserError, match="head 'abmilp' has .* no accuracies in"):
        run_task(report)


def evaluated_section(sweep) -> tuple[list[str], dict[str, list[str]]]:
    """The header and the rows (by head) of results.md's section of the evaluated sets."""
    text = (sweep / "results.md").read_text().split("## Robustness and re-labelled test sets")[1]
    table = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    table = [[cell.strip() for cell in row] for row in table]
    return table[0], {row[0]: row for row in table[1:]}


def winner_of(run_dir) -> str:
    """The head with the best held-out accuracy (heads.csv), the one the report marks."""
    with open(run_dir / "heads.csv") as handle:
        rows = list(csv.DictReader(handle))
    return max(rows, key=lambda row: float(row["val/acc1_best"]))["head"]


def winner_and_same(results, column: str, predictions=None) -> dict[str, str]:
    """The mark each head's cell must end with: " ★" for the held-out winner; for the other
    head (two heads, so Holm leaves its p as is) " ≈" where McNemar's exact test, computed
    here with scipy on ``predictions``, keeps p >= 0.05 (the main table's marks for the test
    column, read from results.md's main table)."""
    run_dir = next(Path(results).parent.glob("0-*")).resolve()
    winner = winner_of(run_dir)
    other = ({"mean", "abmilp"} - {winner}).pop()
    if predictions is None:
        predictions = read_predictions(run_dir / PREDICTIONS)
    first, second = predictions.correct(winner), predictions.correct(other)
    discordant = int((first & ~second).sum()), int((~first & second).sum())
    same = sum(discordant) == 0 or binomtest(discordant[0], sum(discordant)).pvalue >= 0.05
    return {winner: " ★", other: " ≈" if same else ""}


def bracket(correct) -> str:
    """The 95% bootstrap interval of one seed's accuracy, as a report cell writes it."""
    low, high = bootstrap_interval(correct)
    return f"[{100 * low:.2f}, {100 * high:.2f}]"


def test_a_probe_on_a_test_only_set_is_pointed_to_task_evaluate(tmp_path):
    official_copy(tmp_path / "r", "imagenet_r", {})
    overrides = [*FAST, "dataset=imagenet_r", f"dataset.root={tmp_path / 'r'}"]
    with pytest.raises(DataError, match="test set only .* task=evaluate evaluate.run="):
        run_task(compose_config([*overrides, "dataset.num_workers=0"], tmp_path))


@pytest.mark.slow  # a subprocess
def test_python_run_py_task_evaluate_scores_a_set_end_to_end(probe_run, tmp_path):
    """The exact command a user types (its crash went unnoticed by the in-process tests)."""
    sketch = sketches(tmp_path / "sketch", shift=5)
    result = run_cli(
        "task=evaluate",
        f"evaluate.run={probe_run / 'run'}",
        "dataset=imagenet_sketch",
        f"dataset.root={sketch}",
        f"dataset.wnids={probe_run / 'wnids.txt'}",
        "dataset.num_workers=0",
        "resume=false",
        root=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    metrics = probe_run / "run" / "evaluate" / "imagenet_sketch" / "metrics.json"
    summary = json.loads(metrics.read_text())
    assert summary["dataset_config"]["root"] == str(sketch) and summary["images"] == 8
    assert set(summary["heads"]) == {"mean", "abmilp"}
    assert not (tmp_path / "outputs").exists()  # nothing but the probe run's evaluate/ folder


def test_the_command_line_makes_no_folder_for_an_evaluation(tmp_path):
    """``python run.py task=evaluate ...`` resolves ``hydra.run.dir`` first: the root, which
    exists (results go into the probe run scored), not a run name evaluate has none of."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        overrides = ["task=evaluate", f"paths.root_dir={tmp_path}"]
        cfg = compose("config", overrides, return_hydra_config=True)
    assert OmegaConf.select(cfg, "hydra.run.dir") == str(tmp_path)


def test_a_column_whose_winner_was_not_scored_on_a_set_gets_no_marks_there():
    """Two heads of one column in two runs; only the loser's run was scored on the set: the
    set's column keeps that head's accuracy but compares nothing (the winner is chosen on
    held-out, never again among the heads a set happens to have)."""
    from mim_agg.report.evaluated import Evaluations, set_table
    from mim_agg.report.table import Cell

    def cell(run, head, heldout, test):
        row = {"run": run, "head": head, "seed": 0, "val/acc1_best": heldout, "test/acc1": test}
        return Cell([test], [row])

    table = {("mean",): cell("a", "mean", 0.9, 0.8), ("abmilp",): cell("b", "abmilp", 0.7, 0.6)}
    scored = {"b": {"imagenet_r": {"abmilp": {"acc1": 0.3, "acc5": 0.5}}}}
    assert set_table(table, Evaluations(scored, []), "imagenet_r") == {}
    scored["a"] = {"imagenet_r": {"mean": {"acc1": 0.4, "acc5": 0.6}}}
    kept = set_table(table, Evaluations(scored, []), "imagenet_r")
    assert {key: cell.values for key, cell in kept.items()} == {
        ("mean",): [0.4],
        ("abmilp",): [0.3],
    }


def test_a_cell_whose_columns_winner_was_not_scored_still_gets_its_interval(tmp_path):
    """The loser's run alone was scored on the set, with per-image predictions: its cell gets
    the bootstrap interval of its accuracy there (which needs no winner), but no mark."""
    from mim_agg.report.evaluated import Evaluations, set_comparisons
    from mim_agg.report.runs import Job
    from mim_agg.report.table import Cell
    from mim_agg.utils.predictions import HeadPredictions, write_predictions

    targets = np.arange(200) % 10
    correct = np.random.default_rng(7).random(200) < 0.3
    predicted = np.where(correct, targets, (targets + 1) % 10)
    folder = tmp_path / "b" / "evaluate" / "imagenet_r"
    folder.mkdir(parents=True)
    set_images = HeadPredictions.in_image_order(np.arange(200), targets, {"abmilp": predicted}, 10)
    write_predictions(folder / PREDICTIONS, set_images)

    def cell(run, head, heldout, test):
        row = {"run": run, "head": head, "seed": 0, "val/acc1_best": heldout, "test/acc1": test}
        return Cell([test], [row])

    table = {("mean",): cell("a", "mean", 0.9, 0.8), ("abmilp",): cell("b", "abmilp", 0.7, 0.6)}
    scored = {"b": {"imagenet_r": {"abmilp": {"acc1": correct.mean(), "acc5": 0.5}}}}
    jobs = [Job("b", "done", tmp_path / "b")]
    stats = set_comparisons(table, [], Evaluations(scored, jobs), "imagenet_r").cells
    assert stats[("abmilp",)].interval == bootstrap_interval(correct)
    assert not stats[("abmilp",)].winner and stats[("abmilp",)].significant is None
    assert ("mean",) not in stats  # not scored on the set
