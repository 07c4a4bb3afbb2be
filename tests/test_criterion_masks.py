"""Mask losses through MultiRouteCriterion for every route, against a per-pair loop oracle."""

import pytest
import torch
from test_criterion import fixed, make_outputs

from mrdetr import MultiRouteCriterion, RouteMatcher, routes
from mrdetr.segmentation import MaskHead, MaskLoss, mask_losses


def with_masks(seed, q=5, size=(8, 8), canvas=(16, 16)):
    out, targets = make_outputs(seed, q=q)
    gen = torch.Generator().manual_seed(seed + 7)
    out["pred_masks"] = torch.randn(2, q, *size, generator=gen, dtype=torch.float64)
    out["pred_masks"].requires_grad_()
    for t in targets:
        t["masks"] = torch.rand(t["labels"].shape[0], *canvas, generator=gen) > 0.5
    return out, targets


def oracle(pred, targets, pairs, num_boxes):
    """Dense BCE / dice of every matched pair, one pair at a time."""
    bce = dice = 0.0
    for i, (ps, gs) in enumerate(pairs):
        for p, g in zip(ps, gs, strict=True):
            b, d = mask_losses(pred[i, p][None], targets[i]["masks"][g][None], num_points=None)
            bce, dice = bce + b[0], dice + d[0]
    return bce / num_boxes, dice / num_boxes


def test_every_route_gets_mask_losses_on_its_own_pairs():
    route_set = routes.mr_detr()
    pairs = {
        "primary": [([1, 3], [0, 1]), ([0, 2, 4], [2, 0, 1])],  # one-to-one
        "aux_ffn": [([0, 0, 1, 2], [0, 1, 1, 0]), ([4, 3], [2, 2])],  # one-to-many
        "aux_instruct": [([4, 2, 1], [1, 0, 0]), ([1, 0, 2, 3], [0, 1, 2, 2])],
    }
    outputs, targets = {}, None
    for seed, r in enumerate(route_set):
        outputs[r.name], t = with_masks(seed)
        targets = targets or t
    crit = MultiRouteCriterion(
        3,
        RouteMatcher({name: fixed(p) for name, p in pairs.items()}),
        mask_loss=MaskLoss(num_points=None),
        weight_dict={"loss_dice": 2.0},
        route_weights={"aux_ffn": 0.5},
    )
    losses = crit(outputs, targets)
    num_boxes = 5.0
    total = 0.0
    for r in route_set:
        bce, dice = oracle(outputs[r.name]["pred_masks"], targets, pairs[r.name], num_boxes)
        torch.testing.assert_close(losses[f"loss_mask/{r.name}/layer1"], bce)
        torch.testing.assert_close(losses[f"loss_dice/{r.name}/layer1"], dice)
        # aux_outputs carry no pred_masks: no mask term at layer 0
        assert f"loss_mask/{r.name}/layer0" not in losses
        total = total + {"aux_ffn": 0.5}.get(r.name, 1.0) * (5.0 * bce + 2.0 * dice)
    box_terms = sum(
        {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}[k.split("/")[0]]
        * {"aux_ffn": 0.5}.get(k.split("/")[1], 1.0)
        * v
        for k, v in losses.items()
        if k.split("/")[0] in ("loss_class", "loss_bbox", "loss_giou")
    )
    torch.testing.assert_close(losses["loss"], (total + box_terms).to(losses["loss"].dtype))
    losses["loss"].backward()
    for r in route_set:
        assert outputs[r.name]["pred_masks"].grad.abs().sum() > 0


def test_packed_mask_head_through_criterion_with_real_matchers():
    torch.manual_seed(0)
    route_set = routes.mr_detr()
    head = MaskHead(embed_dim=16, num_levels=2, num_heads=4, conv_dim=16)
    shapes, start = torch.tensor([[8, 8], [4, 4]]), torch.tensor([0, 64])
    memory = torch.randn(2, 80, 16)
    hidden = torch.randn(3, 2, 6, 16)  # [R, B, Q, C]
    masks = head(hidden.flatten(0, 1), memory, shapes, start).view(3, 2, 6, 8, 8)
    outputs = {
        r.name: {
            "pred_logits": torch.randn(2, 6, 3),
            "pred_boxes": torch.rand(2, 6, 4) * 0.3 + 0.3,
            "pred_masks": masks[i],
        }  # fmt: skip
        for i, r in enumerate(route_set)
    }
    targets = [
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 2),
            "masks": torch.rand(2, 32, 32) > 0.5,
        }  # fmt: skip
        for _ in range(2)
    ]
    crit = MultiRouteCriterion(3, RouteMatcher.for_routes(route_set), mask_loss=MaskLoss(256))
    losses = crit(outputs, targets)
    for r in route_set:
        assert torch.isfinite(losses[f"loss_mask/{r.name}/layer0"])
        assert losses[f"loss_dice/{r.name}/layer0"] > 0
    losses["loss"].backward()
    assert all(p.grad is not None for p in head.parameters())


def test_bad_mask_inputs():
    out, targets = with_masks(0)
    crit = MultiRouteCriterion(
        3, {"primary": fixed([([0], [0]), ([1], [1])])}, mask_loss=MaskLoss()
    )
    bad = [dict(t) for t in targets]
    bad[0]["masks"] = bad[0]["masks"][:1]
    with pytest.raises(ValueError, match="'masks' must be"):
        crit({"primary": out}, bad)
    bad = [dict(t) for t in targets]
    bad[1]["masks"] = torch.zeros(bad[1]["labels"].shape[0], 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="one canvas size"):
        crit({"primary": out}, bad)
    with pytest.raises(ValueError, match="unknown terms"):
        MultiRouteCriterion(3, {"primary": fixed([])}, weight_dict={"loss_mask": 1.0})
    with pytest.raises(ValueError, match="mask_loss"):
        MultiRouteCriterion(3, {"primary": fixed([])}, mask_loss=3)
