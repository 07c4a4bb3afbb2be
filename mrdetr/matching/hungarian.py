"""One-to-one Hungarian matcher (DETR / Deformable-DETR costs), built on per-image cost blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .costs import (
    add_box_l1_cost,
    add_focal_class_cost,
    add_softmax_class_cost,
    gather_logits,
    iou_block,
    xyxy,
)
from .indices import MatchIndices, empty_indices
from .inputs import PackedTargets, check_predictions, pack_targets
from .workspace import Workspace

__all__ = ["HungarianMatcher", "MatchIndices", "empty_indices", "locate_non_finite"]


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


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to gts (DETR), per image with scipy.

    ``C = cost_class * C_class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``, with
    ``C_class = -softmax(logits)[label]`` (``class_cost="softmax"``, DETR) or the focal cost of
    Deformable-DETR / detrex (``class_cost="focal"``). Costs are computed for the whole batch at
    once as per-image blocks ``[B, Q, N_max]`` (gts padded to the largest image), moved to the CPU
    in one copy, and solved image by image.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs (not all zero).
        class_cost: ``"focal"`` or ``"softmax"``.
        focal_alpha, focal_gamma: parameters of the focal cost.

    Call ``matcher(outputs, targets)`` with ``outputs = {"pred_logits": Tensor[B, Q, K],
    "pred_boxes": Tensor[B, Q, 4]}`` and ``targets`` a list of ``B`` dicts ``{"labels":
    Tensor[N_b] int64, "boxes": Tensor[N_b, 4]}``. Returns a list of ``B`` pairs ``(pred_idx,
    gt_idx)`` of int64 ``Tensor[min(Q, N_b)]`` on the predictions' device, sorted by ``pred_idx``.
    """

    supervision = "o2o"

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if class_cost not in ("focal", "softmax"):
            raise ValueError(f"class_cost must be 'focal' or 'softmax', received {class_cost!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; set at least one weight")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.class_cost = class_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self._workspace = Workspace()

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
        b, q, _ = pred_logits.shape
        n = labels.shape[1]
        dtype = torch.float64 if pred_boxes.dtype == torch.float64 else torch.float32
        pred_logits, pred_boxes, boxes = (x.to(dtype) for x in (pred_logits, pred_boxes, boxes))
        bufs = self._workspace.buffers(5, (b, n, q), dtype, pred_boxes.device)
        cost, scratch = bufs[0].zero_(), bufs[1:]
        qn = [x.view(b, q, n) for x in scratch]  # the same buffers, query-major
        if self.class_cost == "focal":
            gathered = gather_logits(pred_logits, labels, qn[0])
            add_focal_class_cost(
                cost, gathered, qn[1:3], self.cost_class, self.focal_alpha, self.focal_gamma
            )
        else:
            add_softmax_class_cost(cost, pred_logits, labels, qn[0], self.cost_class)
        if self.cost_bbox:
            add_box_l1_cost(cost, boxes, pred_boxes, scratch[0], self.cost_bbox)
        if self.cost_giou:
            giou = iou_block(xyxy(boxes), xyxy(pred_boxes), scratch[0], scratch[1:], giou=True)
            cost.add_(giou, alpha=-self.cost_giou)
        return cost

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping]) -> MatchIndices:
        """Match; see the class docstring for shapes."""
        who = type(self).__name__
        logits, pboxes = check_predictions(outputs, who)
        b, q, k = logits.shape
        packed = pack_targets(targets, b, k, pboxes, who)
        return self.match_packed(logits, pboxes, packed)

    def match_packed(self, logits: Tensor, pboxes: Tensor, packed: PackedTargets) -> MatchIndices:
        """Match validated predictions ``logits (Tensor[B, Q, K])``, ``pboxes (Tensor[B, Q,
        4])`` with validated ``packed`` targets (see :func:`pack_targets`)."""
        who = type(self).__name__
        b, q, _ = logits.shape
        device = logits.device
        if packed.max_size == 0 or q == 0:
            return [empty_indices(device) for _ in range(b)]
        labels, boxes, _ = packed.padded()
        cost = self._cost(logits.detach(), pboxes.detach(), labels, boxes)
        cost = cost.float().cpu().numpy()  # [B, N, Q]: gt-major, scipy's fast layout
        return solve_blocks(cost, packed.sizes, device, logits, pboxes, who)


def solve_blocks(
    cost: np.ndarray, sizes: Sequence[int], device, logits: Tensor, boxes: Tensor, who: str
) -> MatchIndices:
    """Solve each image's block ``cost[b, :N_b, :]`` of ``cost (ndarray[B, N, Q])``; return the
    pairs sorted by prediction, as int64 tensors on ``device``. Non-finite blocks raise."""
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
        gt, pred = linear_sum_assignment(cost[i, :n])
        order = np.argsort(pred)
        pair = torch.from_numpy(np.stack((pred[order], gt[order])).astype(np.int64))
        pair = pair.to(device, non_blocking=True)
        out.append((pair[0], pair[1]))
    return out
