"""Solving gt-major cost blocks image by image, and locating the non-finite predictions behind a
non-finite cost. Shared by every Hungarian-based matcher."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .indices import MatchIndices, empty_indices

__all__ = ["locate_non_finite", "solve_blocks"]


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
    for i, n in enumerate(sizes):
        if n == 0:
            out.append(empty_indices(device))
            continue
        block = cost[i, :n] if repeat == 1 else np.tile(cost[i, :n], (repeat, 1))
        gt, pred = linear_sum_assignment(block)
        order = np.argsort(pred)
        pair = np.stack((pred[order], gt[order] % n)).astype(np.int64)
        pair = torch.from_numpy(pair).to(device, non_blocking=True)
        out.append((pair[0], pair[1]))
    return out
