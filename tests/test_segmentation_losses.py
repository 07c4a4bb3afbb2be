"""Point-sampled mask losses against hand-computed values and a dense-loss oracle."""

import math

import pytest
import torch
import torch.nn.functional as F

from mrdetr.segmentation import (
    dice_loss,
    grid_points,
    mask_losses,
    pairwise_mask_costs,
    point_sample,
    sample_points,
    sigmoid_bce_loss,
)


def test_bce_and_dice_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # row 0: p = (1/2, 1/2): BCE = log 2 per point; dice = 1 - (2*0.5 + 1) / (1 + 1 + 1) = 1/3
    # row 1: p = (3/4, 1/2): BCE = (-log 3/4 - log 1/2) / 2; dice = 1 - (2*1.25+1)/(1.25+2+1)
    bce = sigmoid_bce_loss(logits, targets)
    dice = dice_loss(logits, targets)
    torch.testing.assert_close(
        bce, torch.tensor([math.log(2.0), (math.log(4 / 3) + math.log(2.0)) / 2])
    )
    torch.testing.assert_close(dice, torch.tensor([1 / 3, 1 - 3.5 / 4.25]))


def test_point_sample_reads_pixel_centres_exactly():
    maps = torch.randn(3, 5, 7, dtype=torch.float64)
    pts = grid_points(5, 7, 3, maps)
    torch.testing.assert_close(point_sample(maps, pts), maps.reshape(3, -1))


@pytest.mark.parametrize("pred_size", [(6, 6), (12, 18), (24, 36)])
def test_all_points_equal_dense_loss_oracle(pred_size):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(4, *pred_size, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.rand(4, 12, 18, generator=gen, dtype=torch.float64) > 0.5
    bce, dice = mask_losses(pred, target, num_points=None)
    # oracle: resize the prediction to the gt grid, then the dense per-mask losses
    up = F.interpolate(pred[:, None], size=(12, 18), mode="bilinear", align_corners=False)[:, 0]
    t = target.double().flatten(1)
    x = up.flatten(1)
    ref_bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)
    p = x.sigmoid()
    ref_dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    torch.testing.assert_close(bce, ref_bce)
    torch.testing.assert_close(dice, ref_dice)
    g1 = torch.autograd.grad((bce + dice).sum(), pred)[0]
    g2 = torch.autograd.grad((ref_bce + ref_dice).sum(), pred)[0]
    torch.testing.assert_close(g1, g2)


def test_importance_sampling_prefers_uncertain_points():
    logits = torch.full((2, 32, 32), 8.0)
    logits[:, :, 12:18] = 0.0  # an uncertain band: 6/32 of the area
    gen = torch.Generator().manual_seed(0)
    band = lambda p: ((p[..., 0] >= 12 / 32) & (p[..., 0] < 18 / 32)).double().mean()  # noqa: E731
    pts = sample_points(logits, 2000, oversample_ratio=3.0, importance_ratio=1.0, generator=gen)
    assert pts.shape == (2, 2000, 2)
    assert band(pts) > 0.45  # ~3 * 6/32 = 0.56 of the points, vs 0.19 when uniform
    uniform = sample_points(logits, 2000, oversample_ratio=3.0, importance_ratio=0.0, generator=gen)
    assert band(uniform) < 0.25
    mixed = sample_points(logits, 100, 3.0, 0.75, generator=gen)
    assert mixed.shape == (2, 100, 2) and 0 <= mixed.min() and mixed.max() <= 1


def test_pairwise_costs_match_pair_losses_on_the_same_points():
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(5, 8, 8, generator=gen, dtype=torch.float64)
    target = torch.rand(3, 16, 16, generator=gen) > 0.5
    bce, dice = pairwise_mask_costs(pred, target, 500, generator=torch.Generator().manual_seed(7))
    pts = torch.rand(1, 500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for i in range(5):
        for j in range(3):
            x = point_sample(pred[i : i + 1], pts)
            t = point_sample(target[j : j + 1].double(), pts)
            torch.testing.assert_close(bce[i, j], sigmoid_bce_loss(x, t)[0])
            torch.testing.assert_close(dice[i, j], dice_loss(x, t)[0])


def test_empty_and_bad_input():
    pred = torch.randn(0, 4, 4, requires_grad=True)
    bce, dice = mask_losses(pred, torch.zeros(0, 8, 8, dtype=torch.bool))
    assert bce.shape == (0,) and dice.shape == (0,)
    with pytest.raises(ValueError, match="same number of masks"):
        mask_losses(torch.randn(2, 4, 4), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="pred_masks"):
        mask_losses(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="oversample_ratio"):
        mask_losses(torch.randn(2, 4, 4), torch.zeros(2, 4, 4), 10, oversample_ratio=0.5)
    with pytest.raises(ValueError, match="importance_ratio"):
        mask_losses(torch.randn(2, 4, 4), torch.zeros(2, 4, 4), 10, importance_ratio=2.0)
    with pytest.raises(ValueError, match="num_points"):
        mask_losses(torch.randn(2, 4, 4), torch.zeros(2, 4, 4), 0)
