"""Losses against scalar formulas written from the definitions."""

import math

import pytest
import torch

from mrdetr.losses import giou_loss, l1_loss, sigmoid_focal_loss


def oracle_focal(x, t, alpha, gamma):
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else 1.0
    return a_t * (1 - p_t) ** gamma * ce


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (-1.0, 1.5)])
def test_focal_elementwise(alpha, gamma):
    x = torch.linspace(-4, 4, 11, dtype=torch.float64)
    t = torch.tensor([0, 1, 1, 0, 0.3, 1, 0, 1, 0, 1, 0.5], dtype=torch.float64)
    got = sigmoid_focal_loss(x, t, alpha, gamma)
    want = [oracle_focal(a, b, alpha, gamma) for a, b in zip(x.tolist(), t.tolist(), strict=True)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))
    assert torch.isclose(sigmoid_focal_loss(x, t, alpha, gamma, "sum"), got.sum())
    assert torch.isclose(sigmoid_focal_loss(x, t, alpha, gamma, "mean"), got.mean())


def test_focal_extreme_logits_finite():
    x = torch.tensor([-100.0, 100.0, 0.0], requires_grad=True)
    loss = sigmoid_focal_loss(x, torch.tensor([1.0, 0.0, 1.0]), reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_l1_and_giou_hand_values():
    p = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]])
    t = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]])
    assert torch.allclose(l1_loss(p, t), torch.tensor([[0, 0, 0, 0], [0, 0, 0.5, 0.5]]))
    assert torch.isclose(l1_loss(p, t, "sum"), torch.tensor(1.0))
    # identical boxes -> 0; nested box of area 0.25 inside area 1 -> 1 - 0.25
    assert torch.allclose(giou_loss(p, t), torch.tensor([0.0, 0.75]), atol=1e-6)
    xy = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    far = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    # enclosing 3, union 2 -> giou = -1/3 -> loss 4/3
    assert torch.allclose(giou_loss(xy, far, box_format="xyxy"), torch.tensor([4 / 3]))


def test_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="reduction"):
        l1_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="shape"):
        sigmoid_focal_loss(x, torch.zeros(4))
    with pytest.raises(ValueError, match="box_format"):
        giou_loss(torch.zeros(1, 4), torch.zeros(1, 4), box_format="xywh")
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        giou_loss(torch.zeros(1, 3), torch.zeros(1, 3))
