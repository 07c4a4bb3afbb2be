"""One-to-one Hungarian matcher (DETR / Deformable-DETR costs), built on per-image cost blocks."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Matcher, working_dtype
from .costs import (
    add_box_l1_cost,
    add_focal_class_cost,
    add_softmax_class_cost,
    gather_logits,
    iou_block,
    xyxy,
)
from .indices import MatchIndices, empty_indices
from .inputs import PackedTargets
from .plan import Plan
from .solve import locate_non_finite, raise_non_finite, solve_blocks, solve_pairs
from .workspace import MAX_BYTES, fill_blocks

# MatchIndices, empty_indices, locate_non_finite and solve_blocks live in .indices / .solve;
# they stay importable from here for existing imports.
__all__ = ["HungarianMatcher", "MatchIndices", "empty_indices", "locate_non_finite", "solve_blocks"]


class HungarianMatcher(Matcher):
    """Optimal one-to-one assignment of predictions to gts (DETR), per image with scipy.

    ``C = cost_class * C_class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``, with
    ``C_class = -softmax(logits)[label]`` (``class_cost="softmax"``, DETR) or the focal cost of
    Deformable-DETR / detrex (``class_cost="focal"``). Costs are computed for the whole batch at
    once as per-image blocks ``[B, N_max, Q]`` (gts padded to the largest image), read to the host
    with every other matching problem of the call in one transfer
    (:func:`~mrdetr.matching.batch.match_all`), and solved image by image.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs (not all zero).
        class_cost: ``"focal"`` or ``"softmax"``.
        focal_alpha, focal_gamma: parameters of the focal cost.
        workspace_bytes: bound of the scratch memory kept between calls (see :class:`Matcher`).

    Call ``matcher(outputs, targets)`` with ``outputs = {"pred_logits": Tensor[B, Q, K],
    "pred_boxes": Tensor[B, Q, 4]}`` and ``targets`` a list of ``B`` dicts ``{"labels":
    Tensor[N_b] int64, "boxes": Tensor[N_b, 4]}``. Returns a list of ``B`` pairs ``(pred_idx,
    gt_idx)`` of int64 ``Tensor[min(Q, N_b)]`` on the predictions' device, sorted by ``pred_idx``.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        *,
        workspace_bytes: int = MAX_BYTES,
    ) -> None:
        super().__init__(workspace_bytes=workspace_bytes)
        if class_cost not in ("focal", "softmax"):
            raise ValueError(f"class_cost must be 'focal' or 'softmax', received {class_cost!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; set at least one weight")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.class_cost = class_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, class_cost={self.class_cost!r}"
        )

    def cost_matrix(
        self, pred_logits: Tensor, pred_boxes: Tensor, labels: Tensor, boxes: Tensor
    ) -> Tensor:
        """Matching costs ``Tensor[B, N, Q]`` (gt-major, a fresh tensor) of ``pred_logits
        (Tensor[B, Q, K])``, ``pred_boxes (Tensor[B, Q, 4])`` against padded gts ``labels
        (Tensor[B, N])``, ``boxes (Tensor[B, N, 4])``."""
        return self._cost(pred_logits, pred_boxes, labels, boxes).clone()

    def _cost(self, pred_logits, pred_boxes, labels, boxes) -> Tensor:
        """The cost block, gt-chunk by gt-chunk (a workspace view when it fits in one chunk)."""
        b, q, _ = pred_logits.shape
        n = labels.shape[1]
        dtype = working_dtype(pred_boxes)
        pred_logits, pred_boxes, boxes = (x.to(dtype) for x in (pred_logits, pred_boxes, boxes))
        pred_xyxy = xyxy(pred_boxes)
        lse = pred_logits.logsumexp(-1, keepdim=True) if self.class_cost == "softmax" else None

        def fill(bufs: list[Tensor], rows: slice) -> None:
            cost, scratch = bufs[0].zero_(), bufs[1:]
            lab, gt = labels[:, rows], boxes[:, rows]
            qn = [x.view(b, q, lab.shape[1]) for x in scratch]  # the same buffers, query-major
            if self.class_cost == "focal":
                gathered = gather_logits(pred_logits, lab, qn[0])
                add_focal_class_cost(
                    cost, gathered, qn[1:3], self.cost_class, self.focal_alpha, self.focal_gamma
                )
            else:
                add_softmax_class_cost(cost, pred_logits, lab, qn[0], self.cost_class, lse)
            if self.cost_bbox:
                add_box_l1_cost(cost, gt, pred_boxes, scratch[0], self.cost_bbox)
            if self.cost_giou:
                giou = iou_block(xyxy(gt), pred_xyxy, scratch[0], scratch[1:], giou=True)
                cost.add_(giou, alpha=-self.cost_giou)

        return fill_blocks(self._workspace, 5, (b, n, q), dtype, pred_boxes.device, fill)

    _plans = True  # this class is matched through match_all (see batch.plannable)

    def plan(self, logits: Tensor, pboxes: Tensor, padded, batch: int, repeat: int = 1) -> Plan:
        """Device part of the matching of stacked problems ``logits (Tensor[S*B, Q, K])``,
        ``pboxes (Tensor[S*B, Q, 4])`` against ``padded`` targets (``[S*B, N]``, see
        :class:`~mrdetr.matching.batch.PaddedTargets`), ``batch = B``: the cost block, a fresh
        ``Tensor[S*B, N, Q]`` to read; the plan's ``finish`` solves it on the host."""
        cost = self._cost(logits, pboxes, padded.labels, padded.boxes)
        cost = cost.to(torch.float32, copy=True)  # the workspace is reused by the next plan
        who, sizes = type(self), padded.sizes

        def finish(host: list) -> list:
            (block,) = host
            if not np.isfinite(block).all():
                bad = [i for i, n in enumerate(sizes) if not np.isfinite(block[i, :n]).all()]
                if bad:
                    what = "the matching cost overflows (inf/NaN)"
                    raise_non_finite(bad, batch, logits, pboxes, who.__name__, what)
            return solve_pairs(block, sizes, repeat)

        return Plan([cost], finish)

    def match_packed(
        self, logits: Tensor, pboxes: Tensor, packed: PackedTargets, repeat: int = 1
    ) -> MatchIndices:
        """Match validated predictions ``logits (Tensor[B, Q, K])``, ``pboxes (Tensor[B, Q,
        4])`` with validated ``packed`` targets (see :func:`pack_targets`), each image's gts
        repeated ``repeat`` times (see :func:`solve_blocks`)."""
        b, q, _ = logits.shape
        if packed.max_size == 0 or q == 0:
            return [empty_indices(logits.device) for _ in range(b)]
        labels, boxes, _ = packed.padded()
        cost = self._cost(logits.detach(), pboxes.detach(), labels, boxes)
        cost = cost.float().cpu().numpy()  # [B, N, Q]: gt-major, scipy's fast layout
        who = type(self).__name__
        return solve_blocks(cost, packed.sizes, logits.device, logits, pboxes, who, repeat)
