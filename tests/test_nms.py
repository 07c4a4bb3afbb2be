"""NMS against a brute-force greedy oracle written from the definition (scalar Python loops)."""

import pickle

import pytest
import torch

from mrdetr.nms import batched_nms, nms, nms_mask


def scalar_iou(a, b):
    area = lambda x: max(x[2] - x[0], 0.0) * max(x[3] - x[1], 0.0)  # noqa: E731
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def oracle(boxes, scores, labels, thr, valid=None):
    """Greedy NMS: visit by (-score, index); keep unless a kept box of the same class has
    IoU > thr. Returns kept indices in visiting order."""
    b, s = boxes.tolist(), scores.tolist()
    lab = labels.tolist() if labels is not None else [0] * len(s)
    ok = valid.tolist() if valid is not None else [True] * len(s)
    order = sorted((i for i in range(len(s)) if ok[i]), key=lambda i: (-s[i], i))
    kept = []
    for i in order:
        if all(lab[k] != lab[i] or scalar_iou(b[k], b[i]) <= thr for k in kept):
            kept.append(i)
    return kept


def random_case(n, num_classes, gen, dtype=torch.float64, ties=True):
    xy = torch.rand(n, 2, generator=gen, dtype=dtype)
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * 0.4 + 0.05
    boxes = torch.cat([xy, xy + wh], -1)
    scores = torch.rand(n, generator=gen, dtype=dtype)
    if ties and n > 3:
        scores = (scores * 4).round() / 4  # many exactly equal scores
        boxes[1] = boxes[0]  # identical boxes (IoU exactly 1)
        boxes[3] = boxes[2] + 0.01  # near duplicates
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return boxes, scores, labels


@pytest.mark.parametrize("num_classes", [1, 3, 50])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_batched_nms_matches_oracle(num_classes, thr):
    gen = torch.Generator().manual_seed(num_classes * 7 + int(thr * 10))
    for n in (1, 2, 5, 40):
        boxes, scores, labels = random_case(n, num_classes, gen)
        got = batched_nms(boxes, scores, labels, thr).tolist()
        assert got == oracle(boxes, scores, labels, thr)
        got = nms(boxes, scores, thr).tolist()
        assert got == oracle(boxes, scores, None, thr)


def test_hand_case():
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]]
    )
    scores = torch.tensor([0.9, 0.8, 0.9, 0.5, 0.95])
    labels = torch.tensor([0, 0, 1, 0, 0])
    # box 4 (0.95) suppresses 0 (IoU 1) and 1 (IoU 81/119 = 0.68 > 0.5); box 2 is another class
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [4, 2, 3]
    # class-agnostic: box 2 is suppressed too
    assert nms(boxes, scores, 0.5).tolist() == [4, 3]
    # IoU 0.68 is not > 0.7: box 1 survives
    assert batched_nms(boxes, scores, labels, 0.7).tolist() == [4, 2, 1, 3]


def test_chain_needs_greedy_order():
    # a suppresses b, b would suppress c, but b is suppressed so c survives (greedy, not "fast NMS")
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.3).tolist() == [0, 2]


def test_empty_and_padding():
    e = torch.zeros(0, 4)
    assert nms(e, torch.zeros(0), 0.5).tolist() == []
    assert batched_nms(e, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).tolist() == []
    assert nms_mask(torch.zeros(3, 0, 4), torch.zeros(3, 0), 0.5).shape == (3, 0)


def test_batched_over_images_equals_per_image():
    gen = torch.Generator().manual_seed(0)
    cases = [random_case(30, 4, gen, dtype=torch.float32) for _ in range(6)]
    boxes = torch.stack([c[0] for c in cases])
    scores = torch.stack([c[1] for c in cases])
    labels = torch.stack([c[2] for c in cases])
    valid = torch.rand(6, 30, generator=gen) > 0.2
    valid[0] = False  # an image with no boxes at all
    keep = nms_mask(boxes, scores, 0.5, labels, valid)
    for i in range(6):
        expect = sorted(oracle(boxes[i], scores[i], labels[i], 0.5, valid[i]))
        assert keep[i].nonzero()[:, 0].tolist() == expect
    # extra leading dims are independent images too
    keep2 = nms_mask(boxes.view(2, 3, 30, 4), scores.view(2, 3, 30), 0.5, labels.view(2, 3, 30))
    assert torch.equal(keep2.view(6, 30), nms_mask(boxes, scores, 0.5, labels))


def test_inf_scores_and_inference_mode_and_pickle():
    boxes = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]])
    scores = torch.tensor([float("-inf"), 0.1, float("-inf")])
    with torch.inference_mode():
        assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert pickle.loads(pickle.dumps(nms))(boxes, scores, 0.5).tolist() == [1, 2]


def test_bad_input():
    b, s = torch.rand(4, 4), torch.rand(4)
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.rand(4, 3), s, 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(b, torch.rand(5), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(b, s, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        nms(b, torch.tensor([0.1, float("nan"), 0.2, 0.3]), 0.5)
    with pytest.raises(TypeError, match="labels"):
        batched_nms(b, s, torch.rand(4), 0.5)
    with pytest.raises(ValueError, match="labels"):
        batched_nms(b, s, torch.zeros(3, dtype=torch.long), 0.5)
