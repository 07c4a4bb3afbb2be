"""Independent oracles for the matcher tests (plain formulas, image by image), plus self-checks.

Written from the method's definitions (docs/matching.md) and DETR, not from the library's code.
"""

import itertools
import math

import torch


def sig(x):
    return 1 / (1 + math.exp(-x))


def scalar_giou(a, b):
    """GIoU of two cxcywh boxes given as lists."""
    ax = [a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2]
    bx = [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]
    iw = max(0.0, min(ax[2], bx[2]) - max(ax[0], bx[0]))
    ih = max(0.0, min(ax[3], bx[3]) - max(ax[1], bx[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    enc = (max(ax[2], bx[2]) - min(ax[0], bx[0])) * (max(ax[3], bx[3]) - min(ax[1], bx[1]))
    return inter / union, inter / union - (enc - union) / enc


def scalar_cost(logits, pbox, label, gbox, class_cost="focal", w=(2.0, 5.0, 2.0)):
    """DETR matching cost of one prediction / gt pair (pure Python)."""
    if class_cost == "focal":
        p = sig(logits[label])
        c = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
    else:
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        c = -math.exp(logits[label] - m) / z
    l1 = sum(abs(x - y) for x, y in zip(pbox, gbox, strict=True))
    return w[0] * c + w[1] * l1 - w[2] * scalar_giou(pbox, gbox)[1]


def cost_table(logits, pboxes, labels, gboxes, class_cost="focal"):
    """[Q][N] nested lists of scalar_cost for one image."""
    L, P, lab, G = logits.tolist(), pboxes.tolist(), labels.tolist(), gboxes.tolist()
    return [
        [scalar_cost(L[q], P[q], lab[g], G[g], class_cost) for g in range(len(lab))]
        for q in range(len(P))
    ]


def brute_force_min(table):
    """Minimum total cost over all injective gt -> prediction assignments (N <= Q)."""
    q, n = len(table), len(table[0])
    best = math.inf
    for preds in itertools.permutations(range(q), n):
        best = min(best, sum(table[p][g] for g, p in enumerate(preds)))
    return best


def plain_cost(logits, pboxes, labels, gboxes, class_cost="focal"):
    """[Q, N] float64 cost of one image with plain torch (DETR-style, [Q, N, 2] corners)."""
    logits, pboxes, gboxes = logits.double(), pboxes.double(), gboxes.double()
    if class_cost == "focal":
        p = logits.sigmoid()[:, labels]
        c = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
    else:
        c = -logits.softmax(-1)[:, labels]
    l1 = (pboxes[:, None, :] - gboxes[None, :, :]).abs().sum(-1)
    return 2 * c + 5 * l1 - 2 * plain_iou_giou(pboxes, gboxes)[1]


def plain_iou_giou(pboxes, gboxes):
    """[Q, N] IoU and GIoU of cxcywh boxes, plain torch."""

    def corners(b):
        return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1)

    a, b = corners(pboxes), corners(gboxes)
    lo = torch.max(a[:, None, :2], b[None, :, :2])
    hi = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    union = (pboxes[:, 2] * pboxes[:, 3])[:, None] + (gboxes[:, 2] * gboxes[:, 3])[None] - inter
    elo = torch.min(a[:, None, :2], b[None, :, :2])
    ehi = torch.max(a[:, None, 2:], b[None, :, 2:])
    enc = (ehi - elo).prod(-1)
    iou = inter / union
    return iou, iou - (enc - union) / enc


def o2m_oracle(logits, pboxes, labels, gboxes, k=6, thr=0.4, wi=0.7, wc=0.3, low=True):
    """The five one-to-many rules for one image, with explicit loops and first-index ties.

    Returns a sorted list of (pred, gt) pairs."""
    n, q = len(labels), len(pboxes)
    if n == 0:
        return []
    iou, _ = plain_iou_giou(pboxes, gboxes)
    prob = logits.double().sigmoid()[:, labels]
    quality = (wi * iou + wc * prob).tolist()  # [Q][N]
    best_gt = [max(range(n), key=lambda g, r=row: (r[g], -g)) for row in quality]
    positive = [quality[i][best_gt[i]] >= thr for i in range(q)]
    if low:
        for g in range(n):
            top = max(range(q), key=lambda i, g=g: (quality[i][g], -i))
            positive[top] = True
    count = [0] * n
    for i in range(q):
        if positive[i]:
            count[best_gt[i]] += 1
    pairs = []
    for g in range(n):
        ranked = sorted(range(q), key=lambda i, g=g: (-quality[i][g], i))
        pairs += [(i, g) for i in ranked[: min(count[g], k)]]
    return sorted(pairs)


def random_image(q, n, k, gen, near=True):
    """Random predictions (half of them near the gts when ``near``) and targets of one image."""
    gb = torch.cat(
        [torch.rand(n, 2, generator=gen) * 0.8 + 0.1, torch.rand(n, 2, generator=gen) * 0.3 + 0.05],
        -1,
    )
    pb = torch.cat(
        [torch.rand(q, 2, generator=gen) * 0.8 + 0.1, torch.rand(q, 2, generator=gen) * 0.3 + 0.05],
        -1,
    )
    if near and n:
        m = q // 2
        src = gb[torch.randint(n, (m,), generator=gen)]
        pb[:m] = (src * (1 + 0.2 * torch.randn(m, 4, generator=gen))).clamp(0.01, 0.99)
    logits = torch.randn(q, k, generator=gen) * 2
    labels = torch.randint(k, (n,), generator=gen)
    return logits, pb, {"labels": labels, "boxes": gb}


def random_batch(b, q, sizes, k, seed, near=True):
    gen = torch.Generator().manual_seed(seed)
    items = [random_image(q, n, k, gen, near) for n in sizes]
    outputs = {
        "pred_logits": torch.stack([x[0] for x in items]),
        "pred_boxes": torch.stack([x[1] for x in items]),
    }
    return outputs, [x[2] for x in items]


# --- self-checks of the oracles, so a wrong oracle cannot pass silently ------------------------


def test_scalar_giou_hand_case():
    # [0,0,2,2] vs [1,1,3,3]: inter 1, union 7, enclosing 9
    iou, giou = scalar_giou([1, 1, 2, 2], [2, 2, 2, 2])
    assert math.isclose(iou, 1 / 7) and math.isclose(giou, 1 / 7 - 2 / 9)


def test_plain_cost_equals_scalar_cost():
    gen = torch.Generator().manual_seed(3)
    logits, pb, t = random_image(5, 3, 7, gen)
    for cc in ("focal", "softmax"):
        table = torch.tensor(
            cost_table(logits, pb, t["labels"], t["boxes"], cc), dtype=torch.float64
        )
        assert torch.allclose(plain_cost(logits, pb, t["labels"], t["boxes"], cc), table, atol=1e-5)


def test_o2m_oracle_hand_case():
    # two gts far apart; preds 0,1 on gt 0, pred 2 on gt 1, pred 3 nowhere
    gb = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]])
    pb = torch.tensor(
        [[0.2, 0.2, 0.2, 0.2], [0.21, 0.2, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2], [0.5, 0.5, 0.01, 0.01]]
    )
    logits = torch.full((4, 2), -20.0)
    pairs = o2m_oracle(logits, pb, torch.tensor([0, 1]), gb)
    assert pairs == [(0, 0), (1, 0), (2, 1)]
