"""DETR's softmax classification with a no-object class, against a hand-computed loss."""

import math

import pytest
import torch

from mrdetr.criterion import MultiRouteCriterion
from mrdetr.matching import HungarianMatcher, OneToManyMatcher, RouteMatcher


def fixed(pairs):
    def matcher(outputs, targets):
        return [(torch.tensor(p), torch.tensor(g)) for p, g in pairs]

    return matcher


def detr_loss_ce(logits, targets, pairs, k, eos):
    """sum(w * -log softmax[target]) / sum(w), loops over every prediction."""
    num = den = 0.0
    b, q, _ = logits.shape
    for i in range(b):
        matched = dict(zip(*pairs[i], strict=True))
        for qq in range(q):
            row = logits[i, qq].tolist()
            lse = math.log(sum(math.exp(v) for v in row))
            if qq in matched:
                cls, w = int(targets[i]["labels"][matched[qq]]), 1.0
            else:
                cls, w = k, eos
            num += w * (lse - row[cls])
            den += w
    return num / den


def make(b=2, q=6, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(b, q, k + 1, generator=gen) * 2,
        "pred_boxes": torch.rand(b, q, 4, generator=gen) * 0.4 + 0.2,
    }
    targets = [
        {"labels": torch.tensor([3, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]] * 2)},
        {"labels": torch.tensor([1, 1, 2]), "boxes": torch.tensor([[0.3, 0.6, 0.1, 0.1]] * 3)},
    ]
    return outputs, targets


@pytest.mark.parametrize("eos", [0.1, 1.0, 0.0])
def test_softmax_loss_class_equals_hand_computed_detr_loss(eos):
    outputs, targets = make()
    pairs = [([4, 1], [0, 1]), ([0, 2, 5], [2, 0, 1])]
    criterion = MultiRouteCriterion(
        4, {"primary": fixed(pairs)}, classification="softmax", eos_coef=eos
    )
    got = criterion({"primary": outputs}, targets)["loss_class/primary/layer0"]
    want = detr_loss_ce(outputs["pred_logits"], targets, pairs, 4, eos)
    assert math.isclose(float(got), want, rel_tol=1e-5)
    # the same as DETR's F.cross_entropy with empty_weight
    target_classes = torch.full((2, 6), 4)
    for i, (p, g) in enumerate(pairs):
        target_classes[i, p] = targets[i]["labels"][g]
    weight = torch.ones(5)
    weight[-1] = eos
    if eos > 0:
        ref = torch.nn.functional.cross_entropy(
            outputs["pred_logits"].transpose(1, 2), target_classes, weight
        )
        assert math.isclose(float(got), float(ref), rel_tol=1e-5)


def test_softmax_with_the_softmax_matchers_trains():
    outputs, targets = make()
    for t in (outputs["pred_logits"], outputs["pred_boxes"]):
        t.requires_grad_()
    matcher = RouteMatcher.for_routes(
        [type("R", (), {"name": "p", "supervision": "both"})()], classification="softmax"
    )
    assert matcher.matchers["p"]["o2o"].class_cost == "softmax"
    assert matcher.matchers["p"]["o2m"].classification == "softmax"
    criterion = MultiRouteCriterion(4, matcher, classification="softmax")
    losses = criterion({"p": outputs}, targets)
    losses["loss"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    assert {"loss_class/p:o2o/layer0", "loss_class/p:o2m/layer0"} <= set(losses)


def test_one_to_many_softmax_quality_is_the_softmax_probability():
    outputs, targets = make()
    m = OneToManyMatcher(classification="softmax", iou_weight=0.0, class_weight=1.0)
    labels = torch.tensor([[3, 0]])
    quality = m.quality(outputs["pred_logits"][:1], outputs["pred_boxes"][:1], labels,
                        targets[0]["boxes"][None])  # fmt: skip
    prob = outputs["pred_logits"][0].softmax(-1)[:, [3, 0]].T
    torch.testing.assert_close(quality[0], prob)


def test_bad_classification_and_logit_count_raise():
    with pytest.raises(ValueError, match="classification must be one of .*received 'softmx'"):
        MultiRouteCriterion(4, {"p": HungarianMatcher()}, classification="softmx")
    with pytest.raises(ValueError, match="eos_coef must be a finite number >= 0"):
        MultiRouteCriterion(4, {"p": HungarianMatcher()}, classification="softmax", eos_coef=-1)
    with pytest.raises(ValueError, match="classification must be 'sigmoid' or 'softmax'"):
        OneToManyMatcher(classification="focal")
    outputs, targets = make()
    criterion = MultiRouteCriterion(5, {"p": HungarianMatcher()}, classification="softmax")
    with pytest.raises(ValueError, match=r"has 5 classes, expected num_classes \+ 1 = 6"):
        criterion({"p": outputs}, targets)
