import logging
import math

import pytest
import torch

from mim_agg.builders import build_datamodule, build_probe
from mim_agg.probe import LARS, warmup_cosine
from mim_agg.tasks.probe import build_trainer
from tests.helpers import FAST, compose_config


def test_lars_step_matches_a_hand_computation():
    weight = torch.tensor([[3.0, 4.0]])  # ||w|| = 5
    bias = torch.tensor([1.0])
    weight.grad = torch.tensor([[0.6, 0.8]])
    bias.grad = torch.tensor([0.5])
    lr, wd, trust = 0.1, 0.5, 0.001
    optimizer = LARS(
        [dict(params=[weight], weight_decay=wd), dict(params=[bias], weight_decay=wd, lars=False)],
        lr=lr,
        momentum=0.9,
        trust_coefficient=trust,
    )
    optimizer.step()
    # d = g + wd * w = [2.1, 2.8], ||d|| = 3.5; ratio = 0.001 * 5 / 3.5; mu = d * ratio.
    ratio = trust * 5.0 / 3.5
    expected_weight = torch.tensor([[3.0 - lr * 2.1 * ratio, 4.0 - lr * 2.8 * ratio]])
    torch.testing.assert_close(weight, expected_weight)
    # The bias skips weight decay and the trust ratio: plain momentum SGD.
    torch.testing.assert_close(bias, torch.tensor([1.0 - lr * 0.5]))

    weight.grad = torch.tensor([[0.6, 0.8]])
    bias.grad = torch.tensor([0.5])
    optimizer.step()
    torch.testing.assert_close(bias, torch.tensor([1.0 - lr * 0.5 - lr * (0.9 * 0.5 + 0.5)]))


def test_lars_leaves_zero_parameters_to_plain_momentum():
    weight = torch.zeros(2, 2)
    weight.grad = torch.ones(2, 2)
    LARS([weight], lr=1.0).step()
    torch.testing.assert_close(weight, -torch.ones(2, 2))


@pytest.mark.parametrize("warmup,total", [(10, 100), (0, 50), (3, 4)])
def test_schedule_warms_up_linearly_then_decays_to_zero(warmup, total):
    assert warmup_cosine(0, warmup, total) == (0.0 if warmup else 1.0)
    assert warmup_cosine(warmup, warmup, total) == 1.0
    assert warmup_cosine(total, warmup, total) == pytest.approx(0.0, abs=1e-12)
    if warmup > 1:
        assert warmup_cosine(warmup // 2, warmup, total) == (warmup // 2) / warmup
    if total - warmup > 2:
        middle = warmup + (total - warmup) / 2
        assert warmup_cosine(middle, warmup, total) == pytest.approx(0.5)
        quarter = warmup + (total - warmup) / 4
        assert warmup_cosine(quarter, warmup, total) == pytest.approx(
            0.5 * (1 + math.cos(math.pi / 4))
        )


def fit_probe(overrides: list[str], tmp_path):
    """One epoch of the probe task's own trainer on 150 training images (synthetic, 25 %
    held out); the trainer, after fitting."""
    cfg = compose_config([*FAST, "probe.epochs=1", "probe.warmup_epochs=0", *overrides], tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    trainer = build_trainer(cfg, tmp_path, [], None, datamodule)
    trainer.fit(build_probe(cfg), datamodule=datamodule)
    return trainer


def test_a_batch_larger_than_the_training_set_scales_the_rate_by_the_images_seen(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mim_agg"):
        trainer = fit_probe(["probe.batch_size=10000"], tmp_path)
    assert trainer.global_step == 1  # one step over all 150 images
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1.0 * 150 / 256)
    assert "An epoch trains on 150 images, fewer than" in caplog.text
    assert "blr x 150 / 256" in caplog.text


def test_accumulation_stops_at_an_epoch_and_the_rate_follows_the_images_a_step_sees(tmp_path):
    """effective_batch=1024 of batches of 16 would accumulate 64; an epoch holds 9 (150 images,
    the partial last batch dropped): each step accumulates those 9, i.e. 144 images."""
    trainer = fit_probe(["probe.effective_batch=1024"], tmp_path)
    assert trainer.accumulate_grad_batches == 9 and trainer.global_step == 1
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1.0 * 144 / 256)
