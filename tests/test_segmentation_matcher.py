"""MaskHungarianMatcher: masks decide when boxes and classes cannot; no masks = HungarianMatcher."""

import pytest
import torch
from _threads import intra_op_threads, record_threads

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


def test_mask_path_follows_the_single_thread_rule_and_restores(monkeypatch):
    """The mask costs run under the matchers' one-thread rule on CPU (as every other matcher),
    and the caller's thread count comes back, also when a target's masks are malformed."""
    from mrdetr.segmentation import matcher as matcher_module

    seen = record_threads(monkeypatch, matcher_module, "pairwise_mask_costs")
    with intra_op_threads(2):
        outputs = {"pred_logits": torch.zeros(1, 4, 2), "pred_boxes": torch.full((1, 4, 4), 0.5),
                   "pred_masks": torch.zeros(1, 4, 8, 8)}  # fmt: skip
        target = {"labels": torch.zeros(2, dtype=torch.long), "boxes": torch.full((2, 4), 0.5)}
        MaskHungarianMatcher(num_points=16)(outputs, [{**target, "masks": torch.ones(2, 8, 8) > 0}])
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match=r"'masks' must be \[N=2, H, W\]"):
            MaskHungarianMatcher(num_points=16)(outputs, [{**target, "masks": torch.ones(3, 8, 8)}])
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("pred_masks", [torch.zeros(1, 3, 8, 8), torch.zeros(4, 8, 8), "masks"])
def test_bad_pred_masks_are_reported_even_without_gts(pred_masks):
    """The mask inputs are validated before the empty case, like the logits and boxes."""
    outputs = {"pred_logits": torch.zeros(1, 4, 2), "pred_boxes": torch.full((1, 4, 4), 0.5),
               "pred_masks": pred_masks}  # fmt: skip
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    with pytest.raises(ValueError, match=r"outputs\['pred_masks'\] must be \[B, Q, h, w\]"):
        MaskHungarianMatcher(num_points=16)(outputs, [empty])


def test_mask_matching_of_a_batch_equals_image_by_image():
    """Batched input gives each image the pairs it gets alone (an image without gts included);
    the mask costs' random points are drawn image by image, so one seed covers both runs."""
    gen = torch.Generator().manual_seed(2)
    b, q = 3, 5
    outputs = {"pred_logits": torch.randn(b, q, 3, generator=gen),
               "pred_boxes": torch.rand(b, q, 4, generator=gen) * 0.5 + 0.2,
               "pred_masks": torch.randn(b, q, 8, 8, generator=gen)}  # fmt: skip
    sizes = [2, 0, 3]
    targets = [{"labels": torch.randint(0, 3, (n,), generator=gen),
                "boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.2,
                "masks": torch.rand(n, 16, 16, generator=gen) > 0.5} for n in sizes]  # fmt: skip
    matcher = MaskHungarianMatcher(num_points=64)
    torch.manual_seed(0)
    batched = matcher(outputs, targets)
    torch.manual_seed(0)
    alone = [matcher({k: v[i : i + 1] for k, v in outputs.items()}, [targets[i]])[0]
             for i in range(b)]  # fmt: skip
    for i, ((p, g), (p1, g1)) in enumerate(zip(batched, alone, strict=True)):
        assert len(p) == sizes[i] and p.dtype == g.dtype == torch.int64
        assert torch.equal(p, p1) and torch.equal(g, g1)
