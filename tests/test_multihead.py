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


WD_GRID = [
    *FAST,
    "aggregator=mean",
    "+aggregator@heads.abmilp=abmilp",
    "probe.blrs=[0.1,1.0]",
    "probe.wds=[0.0,0.1]",
    "probe.warmup_epochs=0",
]
RATES, DECAYS = {"0p1": 0.1, "1": 1.0}, {"0": 0.0, "0p1": 0.1}


def test_a_weight_decay_grid_gives_each_rate_and_decay_a_head_and_its_own_groups(tmp_path):
    """2 rates x 2 decays: four heads per aggregator, each with its rate and decay in its own
    parameter group (biases undecayed); after one SGD step from the same start, a decayed
    head's classifier differs from its undecayed twin by exactly -lr x wd x the start."""
    cfg = compose_config(WD_GRID, tmp_path)
    model = build_probe(cfg)
    names = {
        f"{key}_blr{b}_wd{w}": (RATES[b], DECAYS[w])
        for key in ("mean", "abmilp")
        for b in RATES
        for w in DECAYS
    }
    assert set(model.heads) == set(names)
    start = {name: head.classifier.weight.detach().clone() for name, head in model.heads.items()}
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=build_datamodule(cfg))
    groups = {group["name"]: group for group in trainer.optimizers[0].param_groups}
    for name, (blr, wd) in names.items():
        assert groups[name]["initial_lr"] == pytest.approx(blr * 16 / 256)  # blr x batch / 256
        assert groups[name]["weight_decay"] == wd
        assert groups[f"{name}/no_decay"]["weight_decay"] == 0
    for key in ("mean", "abmilp"):
        for b in RATES:
            plain, decayed = (model.heads[f"{key}_blr{b}_wd{w}"] for w in DECAYS)
            lr = groups[f"{key}_blr{b}_wd0p1"]["initial_lr"]
            expected = -lr * 0.1 * start[f"{key}_blr{b}_wd0p1"]
            difference = decayed.classifier.weight - plain.classifier.weight
            torch.testing.assert_close(difference, expected, rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(decayed.classifier.bias, plain.classifier.bias)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_the_weight_decay_grid_is_chosen_on_heldout_and_listed_in_heads_csv(tmp_path):
    overrides = [*FAST, "aggregator=mean", "probe.blrs=[0.1,1.0]", "probe.wds=[0.0,0.5]"]
    summary = run(compose_config([*overrides, "probe.epochs=1"], tmp_path))
    with open(tmp_path / "run" / "heads.csv") as handle:
        rows = {row["head"]: row for row in csv.DictReader(handle)}
    assert {(float(r["blr"]), float(r["wd"])) for r in rows.values()} == {
        (blr, wd) for blr in (0.1, 1.0) for wd in (0.0, 0.5)
    }
    heads = summary["heads"]
    assert summary["winner"] == max(heads, key=lambda name: heads[name]["val/acc1_best"])
    assert len({heads[name]["test/acc1_last"] for name in heads}) > 1  # the grid trains apart


def test_the_weight_decay_grid_renames_no_run_until_it_is_set():
    """``probe.wds`` (null by default) was added after runs were named: a config without it,
    as theirs were, names the same run; a grid names another."""
    from omegaconf import OmegaConf

    from mim_agg.runs.identity import config_hash, result_config

    cfg = compose_config([])
    named = config_hash(result_config(cfg))
    before = OmegaConf.create(OmegaConf.to_container(cfg))  # plain: a key can be deleted
    del before.probe["wds"]
    assert config_hash(result_config(before)) == named
    assert config_hash(result_config(compose_config(["probe.wds=[0.0,0.05]"]))) != named
