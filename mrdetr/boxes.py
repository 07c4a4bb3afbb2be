"""Box utilities: format conversion, pairwise and elementwise IoU / generalized IoU.

Boxes are ``[..., 4]`` tensors, either ``cxcywh`` (centre x, centre y, width, height) or ``xyxy``
(x1, y1, x2, y2). Pairwise functions broadcast over leading batch dimensions, so one call computes
the IoU blocks of a whole batch: ``boxes1 [..., N, 4]`` against ``boxes2 [..., M, 4]`` gives
``[..., N, M]``.

Degenerate boxes never produce NaN: a box with ``x2 < x1`` (or ``y2 < y1``) has zero area, unions
and enclosing areas are clamped below by ``eps``, so two empty boxes have IoU 0 and GIoU 0. For
every pair whose union (and enclosing box) is larger than ``eps`` the results are the exact
textbook values.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-7

__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
    "generalized_box_iou",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert ``boxes (Tensor[..., 4])`` from cxcywh to xyxy; returns ``Tensor[..., 4]``."""
    cx, cy, w, h = boxes.unbind(-1)
    hw, hh = 0.5 * w, 0.5 * h
    return torch.stack((cx - hw, cy - hh, cx + hw, cy + hh), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert ``boxes (Tensor[..., 4])`` from xyxy to cxcywh; returns ``Tensor[..., 4]``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy ``boxes (Tensor[..., 4])`` -> ``Tensor[...]``; inverted boxes have area 0."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)


def _coords(boxes: Tensor, dim: int) -> list[Tensor]:
    """The four coordinates of ``boxes [..., N, 4]`` as contiguous ``[..., N, 1]`` (dim=-1) or
    ``[..., 1, N]`` (dim=-2) tensors, ready to broadcast into ``[..., N, M]`` blocks."""
    return [c.unsqueeze(dim).contiguous() for c in boxes.unbind(-1)]


def _pairwise(boxes1: Tensor, boxes2: Tensor, eps: float, giou: bool):
    """``(iou or giou, union)``, both ``[..., N, M]``.

    Uses ``max(x, y) = x + y - min(x, y)``: the enclosing width is ``w1 + w2 - iw`` with ``iw``
    the unclamped intersection width, which saves four broadcast ops. Intermediate results are
    updated in place unless autograd needs them.
    """
    ax1, ay1, ax2, ay2 = _coords(boxes1, -1)
    bx1, by1, bx2, by2 = _coords(boxes2, -2)
    grad = torch.is_grad_enabled() and (boxes1.requires_grad or boxes2.requires_grad)
    add, sub, mul, div, clamp = (
        (torch.add, torch.sub, torch.mul, torch.div, torch.clamp)
        if grad
        else (Tensor.add_, Tensor.sub_, Tensor.mul_, Tensor.div_, Tensor.clamp_)
    )
    iw = sub(torch.minimum(ax2, bx2), torch.maximum(ax1, bx1))  # may be negative
    ih = sub(torch.minimum(ay2, by2), torch.maximum(ay1, by1))
    aw, ah, bw, bh = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    union = sub(aw.clamp(min=0) * ah.clamp(min=0) + bw.clamp(min=0) * bh.clamp(min=0), inter)
    iou = div(inter, union.clamp(min=eps))
    if not giou:
        return iou, union
    ew = clamp(sub(aw + bw, iw), min=0)  # max(ax2, bx2) - min(ax1, bx1)
    eh = clamp(sub(ah + bh, ih), min=0)
    enclosing = clamp(mul(ew, eh), min=eps)
    # iou - (enclosing - union) / enclosing == iou - 1 + union / enclosing
    return sub(add(iou, torch.div(union, enclosing)), 1.0), union


def _parts(a: Tensor, b: Tensor):
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    iw = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    inter = iw * ih
    area_a = (ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0)
    area_b = (bx2 - bx1).clamp(min=0) * (by2 - by1).clamp(min=0)
    union = area_a + area_b - inter
    return inter, union, (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2)


def _giou(inter: Tensor, union: Tensor, ca, cb, eps: float) -> Tensor:
    iou = inter / union.clamp(min=eps)
    ew = torch.maximum(ca[2], cb[2]) - torch.minimum(ca[0], cb[0])
    eh = torch.maximum(ca[3], cb[3]) - torch.minimum(ca[1], cb[1])
    enclosing = (ew.clamp(min=0) * eh.clamp(min=0)).clamp(min=eps)
    return iou - (enclosing - union) / enclosing


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1 (Tensor[..., N, 4]): xyxy boxes.
        boxes2 (Tensor[..., M, 4]): xyxy boxes; leading dims broadcast against ``boxes1``'s.
        eps: lower clamp of the union, so empty boxes give IoU 0 instead of NaN.

    Returns:
        ``(iou, union)``, both ``Tensor[..., N, M]``.
    """
    return _pairwise(boxes1, boxes2, eps, giou=False)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes.

    Args:
        boxes1 (Tensor[..., N, 4]): xyxy boxes.
        boxes2 (Tensor[..., M, 4]): xyxy boxes; leading dims broadcast against ``boxes1``'s.
        eps: lower clamp of unions and enclosing areas (degenerate boxes give finite values).

    Returns:
        Tensor[..., N, M] with values in ``[-1, 1]``.
    """
    return _pairwise(boxes1, boxes2, eps, giou=True)[0]


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """IoU of matching pairs: ``boxes1 (Tensor[..., 4])``, ``boxes2 (Tensor[..., 4])`` xyxy,
    broadcast together -> ``Tensor[...]``."""
    inter, union, _, _ = _parts(boxes1, boxes2)
    return inter / union.clamp(min=eps)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """Generalized IoU of matching pairs: ``boxes1 (Tensor[..., 4])``, ``boxes2 (Tensor[..., 4])``
    xyxy, broadcast together -> ``Tensor[...]`` in ``[-1, 1]``."""
    inter, union, ca, cb = _parts(boxes1, boxes2)
    return _giou(inter, union, ca, cb, eps)
