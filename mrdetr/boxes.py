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

from collections.abc import Sequence

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
    "iou_terms",
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


def iou_terms(
    a: Sequence[Tensor],
    b: Sequence[Tensor],
    eps: float,
    giou: bool,
    buffers: Sequence[Tensor] | None = None,
    raw_union: bool = False,
) -> tuple[Tensor, Tensor]:
    """IoU or GIoU of xyxy boxes given by coordinates; the one place box overlap is computed.

    Args:
        a, b: ``(x1, y1, x2, y2)`` of the two box sets, four tensors each, all broadcastable to
            one shape ``S`` (elementwise: ``[...]`` each; pairwise: ``[..., N, 1]`` against
            ``[..., 1, M]``).
        eps: lower clamp of the union and of the enclosing area.
        giou: return the generalized IoU instead of the IoU.
        buffers: optional ``Tensor[S]`` scratch buffers, 3 (IoU) or 4 (GIoU); the result is
            written into ``buffers[0]``. Only without autograd (the matchers' cost blocks).
        raw_union: return the union before the ``eps`` clamp (costs one more ``Tensor[S]``).

    Returns:
        ``(iou or giou, union)``, both ``Tensor[S]``. Rule (decided here for every caller): the
        union is clamped at ``eps`` wherever it is used, so the values are the textbook ones when
        union and enclosing area exceed ``eps``, and two empty boxes have IoU 0 and GIoU 0. The
        enclosing width is ``w_a + w_b - iw`` (``max(x, y) = x + y - min(x, y)``), which saves
        four ops; intermediates are updated in place unless autograd needs them.
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*a, *b))
    if grad and buffers is not None:
        raise ValueError("iou_terms: buffers cannot be used with tensors that require grad")
    add, sub, mul, div, clamp = (
        (torch.add, torch.sub, torch.mul, torch.div, torch.clamp)
        if grad
        else (Tensor.add_, Tensor.sub_, Tensor.mul_, Tensor.div_, Tensor.clamp_)
    )
    out, t0, t1, t2 = (*buffers, None)[:4] if buffers is not None else (None,) * 4
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw = sub(torch.minimum(ax2, bx2, out=out), torch.maximum(ax1, bx1, out=t1))  # may be < 0
    ih = sub(torch.minimum(ay2, by2, out=t0), torch.maximum(ay1, by1, out=t1))
    aw, ah, bw, bh = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
    enclosing = None
    if giou:
        ew = clamp(sub(torch.add(aw, bw, out=t1), iw), min=0)  # max(ax2, bx2) - min(ax1, bx1)
        eh = clamp(sub(torch.add(ah, bh, out=t2), ih), min=0)
        enclosing = clamp(mul(ew, eh), min=eps)
    inter = mul(clamp(iw, min=0), clamp(ih, min=0))
    area_a = aw.clamp(min=0) * ah.clamp(min=0)
    area_b = bw.clamp(min=0) * bh.clamp(min=0)
    union = sub(torch.add(area_a, area_b, out=t0), inter)
    raw = union.clone() if raw_union and not grad else union
    union = torch.clamp(union, min=eps) if grad else union.clamp_(min=eps)
    iou = div(inter, union)
    if giou:  # iou - (enclosing - union) / enclosing == iou - 1 + union / enclosing
        ratio = torch.div(union, enclosing, out=None if grad else enclosing)
        iou = sub(add(iou, ratio), 1.0)
    return iou, raw if raw_union else union


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1 (Tensor[..., N, 4]): xyxy boxes.
        boxes2 (Tensor[..., M, 4]): xyxy boxes; leading dims broadcast against ``boxes1``'s.
        eps: lower clamp of the union, so empty boxes give IoU 0 instead of NaN.

    Returns:
        ``(iou, union)``, both ``Tensor[..., N, M]``.
    """
    return iou_terms(_coords(boxes1, -1), _coords(boxes2, -2), eps, False, raw_union=True)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes.

    Args:
        boxes1 (Tensor[..., N, 4]): xyxy boxes.
        boxes2 (Tensor[..., M, 4]): xyxy boxes; leading dims broadcast against ``boxes1``'s.
        eps: lower clamp of unions and enclosing areas (degenerate boxes give finite values).

    Returns:
        Tensor[..., N, M] with values in ``[-1, 1]``.
    """
    return iou_terms(_coords(boxes1, -1), _coords(boxes2, -2), eps, True)[0]


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """IoU of matching pairs: ``boxes1 (Tensor[..., 4])``, ``boxes2 (Tensor[..., 4])`` xyxy,
    broadcast together -> ``Tensor[...]``."""
    return iou_terms(boxes1.unbind(-1), boxes2.unbind(-1), eps, False)[0]


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """Generalized IoU of matching pairs: ``boxes1 (Tensor[..., 4])``, ``boxes2 (Tensor[..., 4])``
    xyxy, broadcast together -> ``Tensor[...]`` in ``[-1, 1]``."""
    return iou_terms(boxes1.unbind(-1), boxes2.unbind(-1), eps, True)[0]
