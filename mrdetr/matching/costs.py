"""Matching costs as gt-major per-image blocks ``[B, N, Q]``, written into caller buffers.

Entry ``[b, g, q]`` compares gt ``g`` of image ``b`` with prediction ``q`` of the same image only
(DETR's batched matcher builds the full ``[B*Q, sum N]`` matrix and discards the off-diagonal
blocks). The gt-major layout keeps the long query axis innermost, which broadcasting, the
reductions over queries and scipy's rectangular solver are all fastest with. Every function
writes its result into ``out`` and uses the given scratch buffers (see
:class:`~mrdetr.matching.workspace.Workspace`), so a matcher call allocates no block-sized
memory. These are no-grad kernels for the matchers; box overlap is
:func:`mrdetr.boxes.iou_terms`, the same code as the differentiable box functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..boxes import EPS, _coords, box_cxcywh_to_xyxy, iou_terms

__all__ = [
    "add_box_l1_cost",
    "add_focal_class_cost",
    "add_softmax_class_cost",
    "gather_logits",
    "iou_block",
    "xyxy",
]


def gather_logits(pred_logits: Tensor, labels: Tensor, out: Tensor) -> Tensor:
    """``out (Tensor[B, Q, N])[b, q, g] <- pred_logits (Tensor[B, Q, K])[b, q, labels[b, g]]``
    for ``labels (Tensor[B, N], int64)``; returns ``out``."""
    b, q, _ = pred_logits.shape
    index = labels[:, None, :].expand(b, q, labels.shape[1])
    return torch.gather(pred_logits, 2, index, out=out)


def iou_block(gt: Tensor, pred: Tensor, out: Tensor, scratch: list[Tensor], giou: bool) -> Tensor:
    """``out (Tensor[B, N, Q]) <-`` IoU (or GIoU) of xyxy ``gt (Tensor[B, N, 4])`` and ``pred
    (Tensor[B, Q, 4])``; ``scratch`` holds 2 (IoU) or 3 (GIoU) ``[B, N, Q]`` buffers.

    :func:`mrdetr.boxes.iou_terms` (the one implementation behind
    :func:`~mrdetr.boxes.box_iou` and :func:`~mrdetr.boxes.generalized_box_iou`) with buffers.
    """
    return iou_terms(_coords(gt, -1), _coords(pred, -2), EPS, giou, [out, *scratch])[0]


def add_focal_class_cost(
    cost: Tensor, logits: Tensor, scratch: list[Tensor], weight: float, alpha: float, gamma: float
) -> Tensor:
    """``cost (Tensor[B, N, Q]) += weight *`` the focal cost of Deformable-DETR / detrex,
    ``alpha (1-p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))`` with
    ``p = sigmoid(logits)`` and ``logits (Tensor[B, Q, N])`` gathered at the gts' labels (see
    :func:`gather_logits`; overwritten). ``scratch``: 2 buffers of ``logits``' shape."""
    p = logits.sigmoid_()
    q = torch.neg(p, out=scratch[0]).add_(1.0)  # 1 - p
    pos = torch.add(p, 1e-8, out=scratch[1]).log_()  # log(p + eps)
    pos.mul_(q).mul_(q) if gamma == 2.0 else pos.mul_(q.pow(gamma))
    neg = q.add_(1e-8).log_()  # log(1 - p + eps)
    neg.mul_(p).mul_(p) if gamma == 2.0 else neg.mul_(p.pow_(gamma))
    # -alpha (1-p)^g log p + (1 - alpha) p^g log(1 - p)
    pos.mul_(-alpha).add_(neg, alpha=1 - alpha)
    return cost.add_(pos.transpose(1, 2), alpha=weight)


def add_softmax_class_cost(
    cost: Tensor,
    pred_logits: Tensor,
    labels: Tensor,
    scratch: Tensor,
    weight: float,
    lse: Tensor | None = None,
) -> Tensor:
    """``cost (Tensor[B, N, Q]) += weight * (-softmax(pred_logits)[label])`` (DETR), for
    ``pred_logits (Tensor[B, Q, K])`` and ``labels (Tensor[B, N])``; ``scratch``: one ``[B, Q,
    N]`` buffer; ``lse (Tensor[B, Q, 1])``: ``pred_logits.logsumexp(-1, keepdim=True)`` when
    already computed. Uses ``softmax(x)[l] = exp(x[l] - logsumexp(x))``: no ``[B, Q, K]``
    temporary."""
    if lse is None:
        lse = pred_logits.logsumexp(-1, keepdim=True)  # [B, Q, 1]
    prob = gather_logits(pred_logits, labels, scratch).sub_(lse).exp_()
    return cost.add_(prob.transpose(1, 2), alpha=-weight)


def add_box_l1_cost(
    cost: Tensor, gt: Tensor, pred: Tensor, scratch: Tensor, weight: float
) -> Tensor:
    """``cost (Tensor[B, N, Q]) += weight * L1(gt, pred)`` for cxcywh ``gt (Tensor[B, N, 4])``
    and ``pred (Tensor[B, Q, 4])``; ``scratch``: one ``[B, N, Q]`` buffer."""
    for a, b in zip(_coords(gt, -1), _coords(pred, -2), strict=True):
        cost.add_(torch.sub(a, b, out=scratch).abs_(), alpha=weight)
    return cost


def xyxy(boxes: Tensor) -> Tensor:
    """cxcywh ``boxes (Tensor[..., 4])`` -> xyxy (see :func:`mrdetr.boxes.box_cxcywh_to_xyxy`)."""
    return box_cxcywh_to_xyxy(boxes)
