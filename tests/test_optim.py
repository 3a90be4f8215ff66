import math

import pytest
import torch

from mim_agg.probe import LARS, warmup_cosine


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
