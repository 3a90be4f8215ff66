"""Many heads, one backbone pass: independent training, honest selection, heads.csv."""

import csv

import pytest
import torch
from lightning import Trainer, seed_everything

from mim_agg.builders import build_datamodule, build_probe, head_grid
from mim_agg.runs.runner import run_task as run
from tests.helpers import FAST, compose_config

GRID = [
    *FAST,
    "aggregator=mean",
    "heads=none",
    "+aggregator@heads.max=max",
    "+aggregator@heads.abmilp=abmilp",
    "probe.blrs=[0.3,3.0]",
    "probe.epochs=3",
]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("grid")
    return run(compose_config(GRID, tmp_path)), tmp_path / "run"


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_grid_writes_one_row_per_head(grid_run):
    summary, output_dir = grid_run
    with open(output_dir / "heads.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    assert {(r["aggregator"], float(r["blr"])) for r in rows} == {
        (a, lr) for a in ("mean", "max", "abmilp") for lr in (0.3, 3.0)
    }
    by_head = {r["head"]: r for r in rows}
    assert int(by_head["abmilp_blr0p3"]["trainable_params"]) == 193 + 192 * 4 + 4
    assert (
        float(by_head["abmilp_blr0p3"]["added_gflops"])
        > float(by_head["mean_blr0p3"]["added_gflops"])
        > 0
    )
    assert summary["winner"] in by_head


def test_winner_is_chosen_on_heldout_never_on_test(grid_run):
    summary, _ = grid_run
    heads = summary["heads"]
    best_heldout = max(heads, key=lambda h: heads[h]["val/acc1_best"])
    assert summary["winner"] == best_heldout
    assert summary["test/acc1"] == heads[best_heldout]["test/acc1"]


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_head_trains_the_same_alone_or_inside_a_grid(tmp_path):
    def train(overrides):
        cfg = compose_config([*FAST, "probe.epochs=2", *overrides], tmp_path)
        seed_everything(0)  # the same random backbone, data order and augmentations
        model = build_probe(cfg)
        trainer = Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
        )
        trainer.fit(model, datamodule=build_datamodule(cfg))
        return model.heads["abmilp"].state_dict()

    alone = train(["aggregator=abmilp"])
    in_grid = train(
        [
            "aggregator=mean",
            "heads=bench8",
            "heads.center_crop.k=2",
            "heads.topk_attn.k=2",
        ]
    )
    for key, value in alone.items():
        torch.testing.assert_close(in_grid[key], value, msg=key)


def test_two_different_heads_with_one_name_are_refused():
    cfg = compose_config(
        [*FAST, "aggregator=abmilp", "+aggregator@heads.abmilp=abmilp", "heads.abmilp.depth=2"]
    )
    with pytest.raises(ValueError, match=r"Two different heads are named 'abmilp'"):
        head_grid(cfg)


def test_several_heads_need_heldout_data():
    cfg = compose_config([*FAST, "probe.blrs=[0.1,1.0]", "dataset.heldout_fraction=0"])
    with pytest.raises(ValueError, match="needs held-out data"):
        head_grid(cfg)


def test_heads_needing_block_cls_and_an_oracle_train_in_one_pass(tmp_path):
    cfg = compose_config(
        [
            *FAST,
            "aggregator=cls",
            "+aggregator@heads.last_n_cls=last_n_cls",
            "heads.last_n_cls.n=3",
            "+aggregator@heads.oracle=oracle_attn",
            "heads.oracle.oracle_arch=vit_tiny_patch16_224",
            "heads.oracle.oracle_weights=null",
            "probe.epochs=1",
        ],
        tmp_path,
    )
    summary = run(cfg)
    assert set(summary["heads"]) == {"cls", "last_n_cls", "oracle"}
    assert summary["heads"]["last_n_cls"]["trainable_params"] == 4 * 192 * 4 + 4
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith("heads.") for k in checkpoint["state_dict"])  # no frozen weights
