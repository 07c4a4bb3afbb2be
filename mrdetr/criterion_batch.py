"""The set losses of many prediction sets in one batched computation.

A criterion call of Mr. DETR has one prediction set per route and decoder layer (3 routes x 6
layers + the encoder's proposals: 19 sets). Computed one set at a time, the focal, L1 and GIoU
losses cost ~250 ATen operations (kernel launches on a GPU) per set, forward and backward. Sets
of one shape are stacked here instead, and each loss runs once over all of them: the focal loss
on ``[G, B, Q, K]`` logits with one scatter of the positives (or DETR's softmax cross entropy
with a no-object class, its weighted mean taken per set), the box losses on the matched pairs
of every set, summed per set with one ``index_add``. The results are the per-set sums the
one-set-at-a-time computation gives (up to the order of float additions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .losses import giou_loss, sigmoid_focal_loss

__all__ = ["TERMS", "grouped_set_losses"]

TERMS = ("loss_class", "loss_bbox", "loss_giou")


def _group_key(out) -> tuple:
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    return tuple(logits.shape), tuple(boxes.shape), logits.dtype, boxes.dtype, logits.device


def grouped_set_losses(
    sets: Sequence[tuple[dict, tuple[Tensor, Tensor, Tensor]]],
    labels: Tensor,
    gt_boxes: Tensor,
    num_boxes: Tensor,
    focal_alpha: float,
    focal_gamma: float,
    *,
    classification: str = "sigmoid",
    eos_coef: float = 0.1,
) -> list[dict[str, Tensor]]:
    """``loss_class``, ``loss_bbox`` (L1) and ``loss_giou`` of every set: the box terms and the
    sigmoid-focal ``loss_class`` summed over the set and divided by ``num_boxes``; the softmax
    ``loss_class`` is the set's weighted mean (:func:`~mrdetr.losses.softmax_class_loss`).

    Args:
        sets: per prediction set, ``(out, (image_idx, pred_idx, gt_idx))``: ``out`` holds
            ``pred_logits (Tensor[B, Q, K])`` and ``pred_boxes (Tensor[B, Q, 4])``; the
            validated flat pairs are ``Tensor[M]`` each, ``gt_idx`` into the packed targets.
        labels (Tensor[N] int64), gt_boxes (Tensor[N, 4]): the packed targets of the batch.
        num_boxes (Tensor[]): the normaliser.
        focal_alpha, focal_gamma: of :func:`~mrdetr.losses.sigmoid_focal_loss`.
        classification: ``"sigmoid"`` (focal) or ``"softmax"`` (``pred_logits`` of
            ``K + 1`` classes, the last no-object, weighted ``eos_coef``).

    Returns:
        One ``{term: Tensor[]}`` per set, in the order of ``sets``.

    Raises:
        ValueError: ``classification`` is neither ``"sigmoid"`` nor ``"softmax"``.
    """
    if classification not in ("sigmoid", "softmax"):
        raise ValueError(
            f"grouped_set_losses: classification must be 'sigmoid' or 'softmax', received "
            f"{classification!r}"
        )
    groups: dict[tuple, list[int]] = {}
    for i, (out, _) in enumerate(sets):
        groups.setdefault(_group_key(out), []).append(i)
    results: list[dict[str, Tensor]] = [{} for _ in sets]
    for members in groups.values():
        vectors = _group_losses(
            [sets[i] for i in members], labels, gt_boxes, num_boxes,
            focal_alpha, focal_gamma, classification, eos_coef,
        )  # fmt: skip
        for term, vec in zip(TERMS, vectors, strict=True):
            for i, value in zip(members, vec.unbind(0), strict=True):
                results[i][term] = value
    return results


def _group_losses(
    sets, labels, gt_boxes, num_boxes, alpha, gamma, classification, eos_coef
) -> tuple[Tensor, ...]:
    """``(loss_class [G], loss_bbox [G], loss_giou [G])`` of ``G`` sets of one shape."""
    logits = torch.stack([out["pred_logits"] for out, _ in sets])  # [G, B, Q, K]
    boxes = torch.stack([out["pred_boxes"] for out, _ in sets])  # [G, B, Q, 4]
    g = len(sets)
    set_idx = torch.cat([
        torch.full_like(flat[0], i) for i, (_, flat) in enumerate(sets)
    ])  # fmt: skip
    image_idx, pred_idx, gt_idx = (torch.cat([flat[k] for _, flat in sets]) for k in range(3))
    cls = labels[gt_idx]
    if classification == "softmax":  # the sets as one batch of G * B images, a mean per set
        per_set = _softmax_per_set(logits, set_idx, image_idx, pred_idx, cls, eos_coef)
    else:
        onehot = torch.zeros_like(logits)
        onehot[set_idx, image_idx, pred_idx, cls] = 1.0
        per_set = sigmoid_focal_loss(logits, onehot, alpha, gamma).flatten(1).sum(1) / num_boxes
    src = boxes[set_idx, image_idx, pred_idx]
    tgt = gt_boxes[gt_idx].to(src.dtype)
    per_pair = torch.stack([(src - tgt).abs().sum(-1), giou_loss(src, tgt)])  # [2, M]
    sums = per_pair.new_zeros(2, g).index_add_(1, set_idx, per_pair)
    return per_set, sums[0] / num_boxes, sums[1] / num_boxes


def _softmax_per_set(logits, set_idx, image_idx, pred_idx, cls, eos_coef) -> Tensor:
    """DETR's softmax ``loss_class`` of each of ``G`` sets (``logits [G, B, Q, K + 1]``): the
    terms of :func:`~mrdetr.losses.softmax_class_loss`, summed per set, then divided."""
    g = logits.shape[0]
    log_p = logits.log_softmax(-1)
    ones = torch.ones_like(pred_idx, dtype=logits.dtype)
    matched = logits.new_zeros(logits.shape[:3]).index_put_(
        (set_idx, image_idx, pred_idx), ones, accumulate=True
    )
    unmatched = (matched == 0).to(logits.dtype) * eos_coef  # [G, B, Q]
    picked = log_p[set_idx, image_idx, pred_idx, cls]
    positive = logits.new_zeros(g).index_add_(0, set_idx, -picked)
    negative = -(log_p[..., -1] * unmatched).flatten(1).sum(1)
    weight = unmatched.flatten(1).sum(1) + logits.new_zeros(g).index_add_(0, set_idx, ones)
    return (positive + negative) / weight.clamp(min=torch.finfo(logits.dtype).tiny)
