"""Checkpoint files that are not what they claim: another architecture, cut short, foreign
keys, a pickle that would run code. Each stops the run with one message that names the file and
the fix (exit status 2 through the CLI), never a traceback and never torch's advice to load
with ``weights_only=False``; nothing in a crafted file runs."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mim_agg.backbones.loading import read_checkpoint
from mim_agg.errors import ConfigError, UserError
from mim_agg.runs.runner import run_task
from tests.helpers import FAST, TINY_ARCH, compose_config, run_cli


class RunsCode:
    """Pickles as a call of ``marker.touch``: loading it would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def cut(path, fraction: float = 0.5):
    """``path`` truncated to ``fraction`` of its bytes, as a full disk or a broken copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def assert_one_message(message: str, path) -> None:
    assert str(path) in message
    assert "weights_only" not in message  # torch's advice to load it anyway is never passed on


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_is_one_message_through_the_cli(tmp_path):
    small = timm.create_model("vit_small_patch16_224", num_classes=0)
    torch.save({"model": small.state_dict()}, tmp_path / "vit_small.pth")
    result = run_cli(*FAST, f"backbone.weights={tmp_path / 'vit_small.pth'}", root=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert f"Checkpoint {str(tmp_path / 'vit_small.pth')!r} (generic format) does not fit " in (
        message
    )
    assert "The checkpoint has embed_dim=384, depth=12. Set backbone.arch" in result.stderr


def write_truncated_pth(path, state):
    torch.save(state, path)
    cut(path)


def write_truncated_safetensors(path, state):
    save_file(state, str(path))
    cut(path)


def write_other_keys_safetensors(path, state):
    save_file({f"text_model.{k}": v for k, v in state.items()}, str(path))


def write_crafted_pickle(path, state):
    torch.save({"model": state, "args": RunsCode(path.with_name("code_ran"))}, path)


def write_deit_distilled(path, state):
    """Two prefix tokens ([cls], distillation): timm's position resampling of this model
    cannot even reshape the table (it used to raise a bare RuntimeError from timm)."""
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0)
    torch.save(deit.state_dict(), path)


BAD_FILES = {
    # name: (writer, file name, error type, what the message says)
    "truncated_pth": (write_truncated_pth, "w.pth", UserError, "is truncated, damaged or not a"),
    "truncated_safetensors": (
        write_truncated_safetensors,
        "w.safetensors",
        UserError,
        r"is truncated, damaged or not a checkpoint \(\d+ bytes; SafetensorError",
    ),
    "safetensors_of_other_keys": (
        write_other_keys_safetensors,
        "w.safetensors",
        ConfigError,
        r"\(generic format\) does not fit .*\n  missing keys: blocks\.0\..*\n  unexpected keys: "
        r"text_model\.",
    ),
    "crafted_pickle": (
        write_crafted_pickle,
        "w.pth",
        UserError,
        "is not a plain tensor checkpoint: it pickles .*nothing in it was executed",
    ),
    "another_grid": (
        write_deit_distilled,
        "w.pth",
        ConfigError,
        r"(?s)does not fit backbone\.arch=vit_tiny_patch16_224.*misshaped keys: pos_embed",
    ),
}


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_weights_file_stops_the_run_with_one_message(case, tmp_path, tiny_state_dict):
    write, name, error, says = BAD_FILES[case]
    path = tmp_path / name
    write(path, tiny_state_dict)
    cfg = compose_config([*FAST, f"backbone.weights={path}"], tmp_path)
    with pytest.raises(error, match=says) as caught:
        run_task(cfg)
    assert_one_message(str(caught.value), path)
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("suffix", [".pth", ".legacy.pth", ".safetensors"])
def test_every_cut_of_a_checkpoint_is_one_message(tmp_path, suffix):
    """torch and safetensors raise a dozen exception types for damaged bytes (OSError,
    RuntimeError, EOFError, UnpicklingError, UnicodeDecodeError, struct.error, ...): every cut
    becomes the same kind of message."""
    state = {"a": torch.randn(64, 8), "b": torch.arange(40)}
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(whole))
    else:
        torch.save(state, whole, _use_new_zipfile_serialization=suffix == ".pth")
    data = whole.read_bytes()
    for length in sorted({0, 1, 8, *range(16, len(data), max(1, len(data) // 60))}):
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(data[:length])
        with pytest.raises(UserError, match="truncated, damaged or not a checkpoint") as caught:
            read_checkpoint(path)
        assert_one_message(str(caught.value), path)


def finished_probe_run(root, damage):
    """A finished probe run's folder as ``load_probe_head`` reads it (config, winner, a
    checkpoint with the probe's keys), its ``last.ckpt`` then spoiled by ``damage``; its path."""
    run_dir = root / "probe"
    (run_dir / "checkpoints").mkdir(parents=True)
    OmegaConf.save(compose_config([*FAST, "aggregator=abmilp"], root), run_dir / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps({"winner": "abmilp"}))
    head = {"classifier.weight": torch.randn(4, 192), "classifier.bias": torch.zeros(4)}
    checkpoint = {
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {f"heads.abmilp.{k}": v for k, v in head.items()},
        "head_selection": {"abmilp": {"state": head, "epoch": 1}},
    }
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    torch.save(checkpoint, ckpt)
    damage(ckpt)
    return ckpt


def foreign(ckpt) -> None:
    """A backbone's weights saved where the probe's checkpoint was."""
    torch.save(timm.create_model(TINY_ARCH, num_classes=0).state_dict(), ckpt)


TASKS = {
    "knn": [*FAST, "task=knn", "aggregator=cls", "knn.k=[5]", "knn.probe_ckpt={}"],
    "analyze": [*FAST, "task=analyze", "analysis.num_images=8", "analysis.probe_ckpt={}"],
}
DAMAGE = {
    "truncated": (cut, r"cannot be read: it is truncated, damaged or not a checkpoint"),
    "foreign": (foreign, r"is no probe run's checkpoint \(it lacks state_dict, head_selection; "),
}


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("task", TASKS)
def test_a_damaged_or_foreign_probe_checkpoint_is_one_message(task, damage, tmp_path):
    spoil, says = DAMAGE[damage]
    ckpt = finished_probe_run(tmp_path, spoil)
    overrides = [o.format(ckpt) for o in TASKS[task]]
    with pytest.raises(UserError, match=says) as caught:
        run_task(compose_config(overrides, tmp_path / "evaluation"))
    assert_one_message(str(caught.value), ckpt)
    assert "pass a finished probe run's last.ckpt, or train that run again" in str(caught.value)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_truncated_last_ckpt_names_the_file_and_resume_false_starts_over(tmp_path):
    command = [*FAST, "probe.epochs=1", "probe.warmup_epochs=0"]
    run_task(compose_config(command, tmp_path))
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "run.json").read_text())
    record["status"] = "preempted"  # stopped after its checkpoint, as a signal leaves it
    (run_dir / "run.json").write_text(json.dumps(record))
    ckpt = cut(run_dir / "checkpoints" / "last.ckpt")

    with pytest.raises(UserError) as refused:
        run_task(compose_config(command, tmp_path))
    message = str(refused.value)
    assert f"Checkpoint {str(ckpt)!r} cannot be read: it is truncated" in message
    assert message.endswith("delete it to restart the run from scratch, or pass resume=false.")

    run_task(compose_config([*command, "resume=false"], tmp_path))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
