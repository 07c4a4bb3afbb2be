"""grouped_set_losses (every prediction set in one batched computation) against the losses of
one set at a time (MultiRouteCriterion.flat_losses), sigmoid focal and DETR's softmax with a
no-object class, including sets of two shapes, a set with no pair, a prediction matched to
several gts, and gradients."""

import pytest
import torch

from mrdetr import MultiRouteCriterion, RouteMatcher, routes
from mrdetr.criterion_batch import grouped_set_losses
from mrdetr.matching.inputs import pack_targets


def _sets(g, num_labels=5):
    b, k, n = 2, 5, 7
    labels = torch.randint(0, num_labels, (n,), generator=g)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=g),
                       0.05 + 0.2 * torch.rand(n, 2, generator=g)], 1)  # fmt: skip
    sets = []
    for q, m in ((9, 6), (9, 0), (9, 8), (4, 3)):  # two shapes; one set with no pair
        out = {
            "pred_logits": torch.randn(b, q, k, generator=g, requires_grad=True),
            "pred_boxes": torch.rand(b, q, 4, generator=g).mul(0.5).add(0.2).requires_grad_(),
        }
        image = torch.randint(0, b, (m,), generator=g)
        pred = torch.randint(0, q, (m,), generator=g)  # repeats: one-to-many pairs
        gt = torch.randint(0, n, (m,), generator=g)
        sets.append((out, (image, pred, gt)))
    return sets, labels, boxes


@pytest.mark.parametrize("classification", ["sigmoid", "softmax"])
def test_batched_equals_one_set_at_a_time_with_gradients(classification):
    k = 5 if classification == "sigmoid" else 4  # softmax: 5 logits, the last no-object
    sets, labels, boxes = _sets(torch.Generator().manual_seed(0), num_labels=k)
    matcher = RouteMatcher.for_routes(routes.mr_detr(), classification=classification)
    criterion = MultiRouteCriterion(k, matcher, classification=classification, eos_coef=0.3)
    targets = [
        {"labels": labels[:3], "boxes": boxes[:3]},
        {"labels": labels[3:], "boxes": boxes[3:]},
    ]
    packed = pack_targets(targets, 2, k, boxes, "test", values=False)
    num = torch.tensor(4.0)
    got = grouped_set_losses(sets, packed.labels, packed.boxes, num, 0.25, 2.0,
                             classification=classification, eos_coef=0.3)  # fmt: skip
    for (out, flat), terms in zip(sets, got, strict=True):
        want = criterion.flat_losses(out, packed, *flat, num)
        assert terms.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(terms[key], want[key], rtol=1e-5, atol=1e-6)
            g1 = torch.autograd.grad(terms[key], [out["pred_logits"], out["pred_boxes"]],
                                     retain_graph=True, allow_unused=True)  # fmt: skip
            g2 = torch.autograd.grad(want[key], [out["pred_logits"], out["pred_boxes"]],
                                     retain_graph=True, allow_unused=True)  # fmt: skip
            for a, b in zip(g1, g2, strict=True):
                if a is None or b is None:
                    assert (a is None or not a.any()) and (b is None or not b.any())
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_classification_is_named():
    sets, labels, boxes = _sets(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"classification must be .* received 'focal'"):
        grouped_set_losses(sets, labels, boxes, torch.tensor(1.0), 0.25, 2.0,
                           classification="focal")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("classification", ["sigmoid", "softmax"])
def test_compiles_with_fullgraph(classification):
    sets, labels, boxes = _sets(torch.Generator().manual_seed(0), num_labels=4)
    num = torch.tensor(4.0)
    kw = {"classification": classification, "eos_coef": 0.3}
    compiled = torch.compile(grouped_set_losses, fullgraph=True)
    got = compiled(sets, labels, boxes, num, 0.25, 2.0, **kw)
    want = grouped_set_losses(sets, labels, boxes, num, 0.25, 2.0, **kw)
    for a, b in zip(got, want, strict=True):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
