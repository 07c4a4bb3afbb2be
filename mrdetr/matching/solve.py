"""Solving gt-major cost blocks image by image, and locating the non-finite predictions behind a
non-finite cost. Shared by every Hungarian-based matcher."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .indices import MatchIndices, empty_indices

__all__ = ["locate_non_finite", "raise_non_finite", "solve_blocks", "solve_pairs"]


def locate_non_finite(logits: Tensor, boxes: Tensor, images: Sequence[int], who: str) -> None:
    """Raise a ``ValueError`` naming the first image of ``images`` whose ``pred_logits``
    (Tensor[B, Q, K]) or ``pred_boxes`` (Tensor[B, Q, 4]) hold NaN/inf; return if none does."""
    for b in images:
        for name, t in (("pred_logits", logits), ("pred_boxes", boxes)):
            if not bool(torch.isfinite(t[b]).all()):
                q = int((~torch.isfinite(t[b])).any(-1).nonzero()[0, 0])
                raise ValueError(
                    f"{who}: image {b}: outputs[{name!r}] must be finite, received "
                    f"{t[b, q].tolist()[:8]} at query {q}"
                )


def solve_blocks(
    cost: np.ndarray,
    sizes: Sequence[int],
    device,
    logits: Tensor,
    boxes: Tensor,
    who: str,
    repeat: int = 1,
) -> MatchIndices:
    """Solve each image's block ``cost[b, :N_b, :]`` of ``cost (ndarray[B, N, Q])``; return the
    pairs sorted by prediction, as int64 tensors on ``device``. Non-finite blocks raise.

    With ``repeat = k > 1`` each image's block is solved with its gts repeated ``k`` times
    (``np.tile``, so the copies are exactly equal; H-DETR's one-to-many matching) and ``gt_idx``
    is mapped back to the original gts, in ``[0, N_b)``.
    """
    if not np.isfinite(cost).all():
        bad = [i for i, n in enumerate(sizes) if not np.isfinite(cost[i, :n]).all()]
        locate_non_finite(logits, boxes, bad, who)
        if bad:
            raise ValueError(f"{who}: image {bad[0]}: the matching cost overflows (inf/NaN)")
    out = []
    for pred, gt in solve_pairs(cost, sizes, repeat):
        if pred.size == 0:
            out.append(empty_indices(device))
            continue
        pair = torch.from_numpy(np.stack((pred, gt))).to(device, non_blocking=True)
        out.append((pair[0], pair[1]))
    return out


def solve_pairs(
    cost: np.ndarray, sizes: Sequence[int], repeat: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The host part of :func:`solve_blocks` on finite ``cost (ndarray[B, N, Q])``: per image
    ``(pred_idx, gt_idx)`` int64 ndarrays, sorted by prediction, ``gt_idx`` in ``[0, N_b)``."""
    out = []
    for i, n in enumerate(sizes):
        if n == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        block = cost[i, :n] if repeat == 1 else np.tile(cost[i, :n], (repeat, 1))
        gt, pred = linear_sum_assignment(block)
        order = np.argsort(pred)
        out.append((pred[order].astype(np.int64), (gt[order] % n).astype(np.int64)))
    return out


def raise_non_finite(
    bad: Sequence[int], batch: int, logits: Tensor, boxes: Tensor, who: str, what: str
) -> None:
    """Error path of a plan over stacked problems (``logits (Tensor[S*B, Q, K])``, ``boxes``):
    for ``bad``, the stacked images with a non-finite cost or quality, raise the
    :func:`locate_non_finite` error of the first problem that has one, naming its image, else
    ``"{who}: image {b}: {what}"``."""
    s = bad[0] // batch
    own = [i - s * batch for i in bad if i // batch == s]
    part = slice(s * batch, (s + 1) * batch)
    locate_non_finite(logits[part], boxes[part], own, who)
    raise ValueError(f"{who}: image {own[0]}: {what}")
