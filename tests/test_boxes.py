"""Box utilities against hand-computed values and a scalar pure-Python oracle."""

import math
import random

import pytest
import torch

from mrdetr.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)


def oracle_iou_giou(a, b):
    """Scalar IoU / GIoU of two xyxy boxes (lists), written from the definitions."""
    area = lambda x: max(x[2] - x[0], 0.0) * max(x[3] - x[1], 0.0)  # noqa: E731
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    enc = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iou = inter / union
    return iou, iou - (enc - union) / enc


def random_xyxy(n, gen):
    c = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    return box_cxcywh_to_xyxy(torch.cat([c, wh], -1))


def test_conversion_hand_case_and_roundtrip():
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    assert torch.allclose(box_cxcywh_to_xyxy(b), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    x = torch.rand(5, 7, 4, dtype=torch.float64)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(x)), x)


def test_iou_giou_hand_cases():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 5.0, 1.0]])
    iou, union = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 4.0, 5.0]]))
    # disjoint: enclosing box [0,0,5,2] area 10, union 5 -> giou = 0 - 5/10
    giou = generalized_box_iou(a, b)
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 1.0, -0.5]]))
    assert torch.allclose(box_area(b), torch.tensor([4.0, 4.0, 1.0]))


@pytest.mark.parametrize("grad", [False, True])
def test_pairwise_matches_scalar_oracle(grad):
    gen = torch.Generator().manual_seed(0)
    a, b = random_xyxy(6, gen), random_xyxy(9, gen)
    a.requires_grad_(grad)
    iou, _ = box_iou(a, b)
    giou = generalized_box_iou(a, b)
    for i in range(6):
        for j in range(9):
            oi, og = oracle_iou_giou(a[i].tolist(), b[j].tolist())
            assert math.isclose(iou[i, j].item(), oi, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(giou[i, j].item(), og, rel_tol=1e-9, abs_tol=1e-12)
    if grad:
        giou.sum().backward()
        assert torch.isfinite(a.grad).all()


def test_batched_leading_dims_and_elementwise_agree_with_pairwise():
    gen = torch.Generator().manual_seed(1)
    a = random_xyxy(3 * 5, gen).view(3, 5, 4)
    b = random_xyxy(3 * 4, gen).view(3, 4, 4)
    batched = generalized_box_iou(a, b)
    for i in range(3):
        assert torch.allclose(batched[i], generalized_box_iou(a[i], b[i]))
    c = random_xyxy(5, gen)
    pair = generalized_box_iou(a[0], c)
    assert torch.allclose(elementwise_generalized_box_iou(a[0], c), pair.diagonal())
    assert torch.allclose(elementwise_box_iou(a[0], c), box_iou(a[0], c)[0].diagonal())


def test_degenerate_boxes_are_finite():
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    inverted = torch.tensor([[0.6, 0.6, 0.4, 0.4]])
    normal = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    for a in (point, inverted):
        for b in (point, inverted, normal):
            for v in (box_iou(a, b)[0], generalized_box_iou(a, b)):
                assert torch.isfinite(v).all()
                assert (v >= -1).all() and (v <= 1).all()
    assert box_iou(point, point)[0].item() == 0.0
    assert box_area(inverted).item() == 0.0
    x = point.clone().requires_grad_(True)
    elementwise_generalized_box_iou(x, point).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_random_against_oracle_many():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.random() for _ in range(2)]
        a += [a[0] + rng.random(), a[1] + rng.random()]
        b = [rng.random() for _ in range(2)]
        b += [b[0] + rng.random(), b[1] + rng.random()]
        ta, tb = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
        oi, og = oracle_iou_giou(a, b)
        assert math.isclose(elementwise_box_iou(ta, tb).item(), oi, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(
            elementwise_generalized_box_iou(ta, tb).item(), og, rel_tol=1e-9, abs_tol=1e-12
        )


def _all_giou(a, b):
    """GIoU of xyxy a [N, 4] vs b [M, 4] by every entry point: pairwise (no grad / grad),
    elementwise over the broadcast pairs, and the matchers' buffered cost block."""
    from mrdetr.matching.costs import iou_block

    n, m = a.shape[0], b.shape[0]
    pair = generalized_box_iou(a, b)
    grad = generalized_box_iou(a.clone().requires_grad_(True), b).detach()
    elem = elementwise_generalized_box_iou(a[:, None].expand(n, m, 4), b[None].expand(n, m, 4))
    bufs = [torch.empty(1, n, m, dtype=a.dtype) for _ in range(4)]
    block = iou_block(a[None], b[None], bufs[0], bufs[1:], giou=True)[0]
    return pair, grad, elem, block


def test_one_giou_rule_for_every_entry_point_degenerate_boxes():
    """Two empty boxes have GIoU 0 (the module's rule: the union is clamped at eps wherever it
    is used); the differentiable functions used to give -1 where the matcher cost gave 0."""
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    far_point = torch.tensor([[0.9, 0.1, 0.9, 0.1]])
    inverted = torch.tensor([[0.6, 0.6, 0.4, 0.4]])
    normal = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    a = torch.cat([point, inverted, normal, far_point])
    for v in _all_giou(a, a):
        torch.testing.assert_close(v, _all_giou(a, a)[0], rtol=0, atol=1e-6)
    pair = generalized_box_iou(a, a)
    assert pair[0, 0].item() == 0.0 and pair[1, 1].item() == 0.0 and pair[0, 1].item() == 0.0
    # two distinct points: enclosing box 0.4 x 0.4, union ~ 0 -> the textbook limit -1
    assert pair[0, 3].item() == pytest.approx(-1.0, abs=1e-5)
    assert pair[2, 2].item() == pytest.approx(1.0)
    # a point inside the unit box: iou 0, enclosing = union = 1 -> giou 0
    assert pair[0, 2].item() == pytest.approx(0.0, abs=1e-6)


def test_every_entry_point_agrees_on_random_boxes():
    gen = torch.Generator().manual_seed(3)
    a, b = random_xyxy(7, gen), random_xyxy(5, gen)
    pair, grad, elem, block = _all_giou(a, b)
    for v in (grad, elem, block):
        torch.testing.assert_close(v, pair, rtol=1e-12, atol=1e-12)
    for i in range(7):
        for j in range(5):
            assert math.isclose(pair[i, j].item(), oracle_iou_giou(a[i].tolist(), b[j].tolist())[1],
                                rel_tol=1e-9, abs_tol=1e-12)  # fmt: skip
