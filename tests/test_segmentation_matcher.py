"""MaskHungarianMatcher: masks decide when boxes and classes cannot; no masks = HungarianMatcher."""

import torch

from mrdetr.matching import HungarianMatcher
from mrdetr.segmentation import MaskHungarianMatcher


def test_masks_decide_the_assignment():
    gen = torch.Generator().manual_seed(0)
    b, q, n = 2, 6, 3
    outputs = {
        "pred_logits": torch.zeros(b, q, 2),
        "pred_boxes": torch.full((b, q, 4), 0.5),  # every prediction has the same box and class
    }
    gt_masks = [torch.rand(n, 16, 16, generator=gen) > 0.5 for _ in range(b)]
    perm = [torch.randperm(q, generator=gen)[:n] for _ in range(b)]
    pred_masks = torch.full((b, q, 16, 16), -5.0)
    for i in range(b):
        pred_masks[i, perm[i]] = gt_masks[i].float() * 10 - 5  # query perm[i][g] predicts gt g
    outputs["pred_masks"] = pred_masks
    targets = [
        {"labels": torch.zeros(n, dtype=torch.long), "boxes": torch.full((n, 4), 0.5), "masks": m}
        for m in gt_masks
    ]
    matcher = MaskHungarianMatcher(num_points=2000)
    for i, (p, g) in enumerate(matcher(outputs, targets)):
        assert torch.equal(perm[i][g], p)


def test_without_pred_masks_it_is_the_hungarian_matcher():
    gen = torch.Generator().manual_seed(1)
    outputs = {"pred_logits": torch.randn(2, 7, 3, generator=gen),
               "pred_boxes": torch.rand(2, 7, 4, generator=gen) * 0.5 + 0.2}  # fmt: skip
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4, generator=gen) * 0.5}] * 2
    a = MaskHungarianMatcher()(outputs, targets)
    b = HungarianMatcher()(outputs, targets)
    for (p1, g1), (p2, g2) in zip(a, b, strict=True):
        assert torch.equal(p1, p2) and torch.equal(g1, g2)
