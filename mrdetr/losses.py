"""Elementwise detection losses with a ``reduction`` argument: sigmoid focal, L1 and GIoU.

``reduction`` is ``"none"`` (same shape as the loss terms), ``"mean"`` or ``"sum"`` (scalars), as in
``torch.nn.functional``. The DETR-style normalisation by the number of gt boxes is the caller's
(see :class:`mrdetr.criterion.MultiRouteCriterion`): use ``reduction="sum"`` and divide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou

__all__ = [
    "CLASSIFICATIONS",
    "giou_loss",
    "l1_loss",
    "matched_mask_losses",
    "sigmoid_focal_loss",
    "softmax_class_loss",
]

CLASSIFICATIONS = ("sigmoid", "softmax")
"""Classification losses of the criterion: sigmoid focal (``K`` logits) or DETR's softmax with a
no-object class (``K + 1`` logits)."""

_REDUCTIONS = ("none", "mean", "sum")
_FORMATS = ("cxcywh", "xyxy")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, received {reduction!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, received {reduction!r}")


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017), as used by Deformable-DETR and DINO.

    ``loss = alpha_t * (1 - p_t) ** gamma * BCE(inputs, targets)`` with ``p = sigmoid(inputs)``,
    ``p_t = p * t + (1 - p) * (1 - t)`` and ``alpha_t = alpha * t + (1 - alpha) * (1 - t)``; a
    negative ``alpha`` disables the alpha weighting.

    Args:
        inputs (Tensor[...]): logits.
        targets (Tensor[...]): same shape, values in ``[0, 1]`` (one-hot or soft).
        alpha: weight of the positives, in ``[0, 1]``, or negative for none.
        gamma: focusing exponent, ``>= 0``.
        reduction: ``"none"`` (Tensor[...]), ``"mean"`` or ``"sum"`` (scalar).
    """
    _check_reduction(reduction)
    if inputs.shape != targets.shape:
        raise ValueError(
            f"sigmoid_focal_loss: inputs and targets must have the same shape, received "
            f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    targets = targets.to(inputs.dtype)
    p = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def l1_loss(pred: Tensor, target: Tensor, reduction: str = "none") -> Tensor:
    """Elementwise L1 loss ``|pred - target|`` of ``pred (Tensor[...])`` and ``target
    (Tensor[...])``; ``"none"`` returns ``Tensor[...]``."""
    _check_reduction(reduction)
    if pred.shape != target.shape:
        raise ValueError(
            f"l1_loss: pred and target must have the same shape, received "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return _reduce((pred - target).abs(), reduction)


def giou_loss(
    pred_boxes: Tensor, target_boxes: Tensor, box_format: str = "cxcywh", reduction: str = "none"
) -> Tensor:
    """Generalized-IoU loss ``1 - GIoU`` of matching box pairs.

    Args:
        pred_boxes (Tensor[..., 4]): predicted boxes.
        target_boxes (Tensor[..., 4]): target boxes, same shape.
        box_format: ``"cxcywh"`` (DETR's) or ``"xyxy"``.
        reduction: ``"none"`` (Tensor[...]), ``"mean"`` or ``"sum"`` (scalar).
    """
    _check_reduction(reduction)
    if box_format not in _FORMATS:
        raise ValueError(
            f"giou_loss: box_format must be one of {_FORMATS}, received {box_format!r}"
        )
    if pred_boxes.shape != target_boxes.shape or pred_boxes.shape[-1:] != (4,):
        raise ValueError(
            f"giou_loss: pred_boxes and target_boxes must both be [..., 4], received "
            f"{tuple(pred_boxes.shape)} and {tuple(target_boxes.shape)}"
        )
    if box_format == "cxcywh":
        pred_boxes = box_cxcywh_to_xyxy(pred_boxes)
        target_boxes = box_cxcywh_to_xyxy(target_boxes)
    return _reduce(1 - elementwise_generalized_box_iou(pred_boxes, target_boxes), reduction)


def softmax_class_loss(
    logits: Tensor, image_idx: Tensor, pred_idx: Tensor, labels: Tensor, eos_coef: float = 0.1
) -> Tensor:
    """DETR's classification loss: softmax cross entropy with a no-object class.

    Every matched pair ``(image_idx[m], pred_idx[m])`` is a sample of class ``labels[m]`` with
    weight 1; every prediction matched to no gt is a sample of the no-object class (the last
    logit) with weight ``eos_coef``; the loss is the weighted mean, ``sum(w * ce) / sum(w)``, as
    DETR's ``F.cross_entropy(logits, target_classes, weight=empty_weight)``. With one-to-one
    pairs it equals DETR's loss exactly; a prediction matched to several gts (one-to-many) is a
    sample of each of their classes.

    Args:
        logits (Tensor[B, Q, K + 1]): class logits, the last one no-object.
        image_idx, pred_idx (Tensor[M], int64): the matched predictions.
        labels (Tensor[M], int64): their gts' classes, in ``[0, K)``.
        eos_coef: weight of the no-object samples, ``>= 0``.

    Returns:
        ``Tensor[]``.
    """
    if logits.dim() != 3 or logits.shape[-1] < 2:
        raise ValueError(
            f"softmax_class_loss: logits must be [B, Q, K + 1] with K >= 1, received "
            f"{tuple(logits.shape)}"
        )
    log_p = logits.log_softmax(-1)
    matched = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
    matched = matched.index_put_(
        (image_idx, pred_idx), torch.ones_like(pred_idx, dtype=logits.dtype), accumulate=True
    )
    unmatched = (matched == 0).to(logits.dtype) * eos_coef  # [B, Q]
    positive = -log_p[image_idx, pred_idx, labels].sum()
    negative = -(log_p[..., -1] * unmatched).sum()
    weight = unmatched.sum() + pred_idx.shape[0]
    return (positive + negative) / weight.clamp(min=torch.finfo(logits.dtype).tiny)


def matched_mask_losses(mask_loss, pred, targets, indices, num_boxes: Tensor) -> dict[str, Tensor]:
    """``loss_mask`` and ``loss_dice`` of ``pred (Tensor[B, Q, h, w])`` (mask logits) on the
    matched pairs ``indices`` (per image ``(pred_idx, gt_idx)``) against ``targets[b]["masks"]
    (Tensor[N_b, H, W])``, with ``mask_loss(pred (Tensor[M, h, w]), target (Tensor[M, H, W]))
    -> (bce (Tensor[M]), dice (Tensor[M]))``, summed and divided by ``num_boxes``."""
    b = len(targets)
    if not isinstance(pred, Tensor) or pred.dim() != 4 or pred.shape[0] != b:
        got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"MultiRouteCriterion: 'pred_masks' must be [B={b}, Q, h, w], got {got}")
    src, tgt, canvas = [], [], None
    for i, (p, g) in enumerate(indices):
        masks = targets[i].get("masks")
        n = targets[i]["labels"].shape[0]
        if not isinstance(masks, Tensor) or masks.dim() != 3 or masks.shape[0] != n:
            got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(
                f"MultiRouteCriterion: image {i}: 'masks' must be [N={n}, H, W] "
                f"(needed with mask_loss and 'pred_masks'), received {got}"
            )
        if canvas is not None and masks.shape[-2:] != canvas:
            raise ValueError(
                f"MultiRouteCriterion: image {i}: 'masks' are {tuple(masks.shape[-2:])}, "
                f"image 0's are {tuple(canvas)}; use one canvas size for the batch"
            )
        canvas = masks.shape[-2:]
        src.append(pred[i, p.to(pred.device)])
        tgt.append(masks[g.to(masks.device)])
    bce, dice = mask_loss(torch.cat(src), torch.cat(tgt).to(pred.device))
    return {"loss_mask": bce.sum() / num_boxes, "loss_dice": dice.sum() / num_boxes}
