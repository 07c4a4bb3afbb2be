"""Class-aware non-maximum suppression in plain PyTorch, batched over images.

Greedy NMS: visit boxes by decreasing score (ties: lower index first); keep a box unless a kept,
higher-ranked box of the *same class* overlaps it with IoU ``> iou_threshold`` (strictly greater,
torchvision's convention). IoU is :func:`mrdetr.boxes.box_iou` on xyxy boxes.

The greedy result is the unique solution of ``keep[j] = not any(keep[i] and S[i, j] for i < j)``
(``S``: rank-sorted suppression matrix, upper triangular). :func:`nms_mask` solves it by fixed
point iteration from ``keep = all True`` (Cluster-NMS, Zheng et al. 2021): iteration ``t`` fixes
at least rank ``t``, so it stops after at most ``N`` steps, usually after a handful, and every
step is one batched ``[B, N] x [B, N, N]`` product instead of ``N`` sequential steps. Memory is
``O(B N^2)``: fine for DETR's few hundred queries per image, not for tens of thousands of boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .boxes import box_iou

__all__ = ["batched_nms", "nms", "nms_mask"]


def _check(boxes: Tensor, scores: Tensor, labels: Tensor | None, valid: Tensor | None, thr):
    if not isinstance(boxes, Tensor) or boxes.dim() < 2 or boxes.shape[-1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"nms: boxes must be a Tensor[..., N, 4] (xyxy), received {got}")
    if not boxes.is_floating_point():
        raise TypeError(f"nms: boxes must be floating, received {boxes.dtype}")
    lead = tuple(boxes.shape[:-1])
    if not isinstance(scores, Tensor) or tuple(scores.shape) != lead:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"nms: scores must be a Tensor{list(lead)} like boxes[..., 0], got {got}")
    for name, t in (("labels", labels), ("valid", valid)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != lead):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"nms: {name} must be a Tensor{list(lead)} or None, received {got}")
    if labels is not None and labels.is_floating_point():
        raise TypeError(f"nms: labels must be an integer tensor, received {labels.dtype}")
    if valid is not None and valid.dtype != torch.bool:
        raise TypeError(f"nms: valid must be a bool tensor, received {valid.dtype}")
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
        raise ValueError(f"nms: iou_threshold must be a float in [0, 1], received {thr!r}")
    if bool(torch.isnan(scores).any()) or not bool(torch.isfinite(boxes).all()):
        raise ValueError("nms: boxes must be finite and scores must not be NaN")


@torch.no_grad()
def nms_mask(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    labels: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Greedy class-aware NMS of every image of a batch at once.

    Args:
        boxes (Tensor[..., N, 4]): xyxy boxes; leading dims (e.g. ``B``) are independent images.
        scores (Tensor[..., N]): higher is better (``-inf`` allowed, NaN is an error).
        iou_threshold: a box is suppressed by a kept higher-ranked box with IoU ``>`` this.
        labels (Tensor[..., N], int, optional): class of each box; boxes only suppress boxes of
            their own class. None: class-agnostic.
        valid (Tensor[..., N], bool, optional): False marks padding: never kept, suppresses
            nothing (images with different numbers of boxes in one padded batch).

    Returns:
        Tensor[..., N] bool: True for kept boxes, in the input order.
    """
    _check(boxes, scores, labels, valid, iou_threshold)
    lead, n = boxes.shape[:-2], boxes.shape[-2]
    if n == 0 or boxes.numel() == 0:
        return torch.zeros(*lead, n, dtype=torch.bool, device=boxes.device)
    boxes = boxes.reshape(-1, n, 4)  # [B, N, 4]
    scores = scores.reshape(-1, n)  # [B, N]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, N]
    sorted_boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4))
    iou = box_iou(sorted_boxes, sorted_boxes)[0]  # [B, N, N]
    suppress = (iou > iou_threshold).triu_(diagonal=1)  # rank i suppresses rank j > i
    if labels is not None:
        lab = torch.gather(labels.reshape(-1, n), 1, order)  # [B, N]
        suppress &= lab[:, :, None] == lab[:, None, :]
    alive = torch.ones_like(scores, dtype=torch.bool)
    if valid is not None:
        alive = torch.gather(valid.reshape(-1, n), 1, order)
        suppress &= alive[:, :, None]
    s = suppress.to(boxes.dtype if boxes.dtype == torch.float64 else torch.float32)
    keep = alive.clone()
    for _ in range(n):
        hit = torch.bmm(keep[:, None, :].to(s.dtype), s)[:, 0] > 0  # [B, N]
        new = alive & ~hit
        if torch.equal(new, keep):
            break
        keep = new
    out = torch.zeros_like(keep)
    out.scatter_(1, order, keep)
    return out.reshape(*lead, n)


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware NMS of one image, torchvision's ``batched_nms`` signature.

    Args:
        boxes (Tensor[N, 4]): xyxy boxes.
        scores (Tensor[N]): scores.
        labels (Tensor[N], int): class (or any group id) of each box.
        iou_threshold: suppression threshold (IoU ``>``).

    Returns:
        Tensor[K] int64: indices of the kept boxes, by decreasing score (ties: lower index first).
    """
    if not isinstance(boxes, Tensor) or boxes.dim() != 2:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"batched_nms: boxes must be a Tensor[N, 4], received {got}")
    keep = nms_mask(boxes, scores, iou_threshold, labels)
    idx = keep.nonzero()[:, 0]
    return idx[torch.sort(scores[idx], descending=True, stable=True).indices]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Class-agnostic NMS of ``boxes (Tensor[N, 4])`` xyxy with ``scores (Tensor[N])``; returns the
    kept indices ``Tensor[K]`` int64 by decreasing score (torchvision's ``nms`` signature)."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"nms: boxes must be a Tensor[N, 4], received {got}")
    keep = nms_mask(boxes, scores, iou_threshold)
    idx = keep.nonzero()[:, 0]
    return idx[torch.sort(scores[idx], descending=True, stable=True).indices]
