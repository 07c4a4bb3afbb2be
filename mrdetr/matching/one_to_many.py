"""Deterministic one-to-many matcher of the DETA / DAC-DETR / MS-DETR family (Mr. DETR's o2m)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Matcher, working_dtype
from .costs import gather_logits, iou_block, xyxy
from .plan import Plan
from .solve import raise_non_finite
from .workspace import MAX_BYTES, fill_blocks

__all__ = ["OneToManyMatcher"]


class OneToManyMatcher(Matcher):
    """Assign each gt up to ``k`` predictions by matching quality, for the whole batch at once.

    The rules (per image; ``quality`` is computed from detached predictions):

    1. ``quality[q, g] = iou_weight * IoU(pred q, gt g) + class_weight * sigmoid(logit[q,
       label_g])`` (``classification="softmax"``: ``softmax(logits[q])[label_g]``, DETR's
       class probability with a no-object logit);
    2. each prediction's best gt is ``argmax_g quality[q, g]``; the prediction is positive when
       that quality is ``>= iou_threshold``;
    3. with ``low_quality_matches``, each gt's single highest-quality prediction is positive too
       (it keeps its own best gt, which may be another gt);
    4. ``count_g`` = number of positive predictions whose best gt is ``g``;
    5. each gt with ``count_g > 0`` is paired with its ``min(count_g, k)`` highest-quality
       predictions over all predictions (positive or not).

    Ties are broken towards the lower index everywhere (argmax in 2 and 3, ranking in 5), so the
    result is deterministic and the same on every device. A prediction may be paired with several
    gts. No random subsampling of positives is done (the reference caps them at 225 at random).

    Call ``matcher(outputs, targets)`` with ``outputs = {"pred_logits": Tensor[B, Q, K],
    "pred_boxes": Tensor[B, Q, 4]}`` (cxcywh) and ``targets`` a list of ``B`` dicts ``{"labels":
    Tensor[N_b] int64, "boxes": Tensor[N_b, 4]}``. Returns, per image, ``(pred_idx, gt_idx)`` int64
    ``Tensor[M_b]`` on the predictions' device, ordered by gt, then by decreasing quality.
    """

    def __init__(
        self,
        k: int = 6,
        iou_threshold: float = 0.4,
        iou_weight: float = 0.7,
        class_weight: float = 0.3,
        low_quality_matches: bool = True,
        *,
        classification: str = "sigmoid",
        workspace_bytes: int = MAX_BYTES,
    ) -> None:
        super().__init__(workspace_bytes=workspace_bytes)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"OneToManyMatcher: k must be an int >= 1, received {k!r}")
        if classification not in ("sigmoid", "softmax"):
            raise ValueError(
                "OneToManyMatcher: classification must be 'sigmoid' or 'softmax', received "
                f"{classification!r}"
            )
        self.classification = classification
        self.k, self.iou_threshold = k, iou_threshold
        self.iou_weight, self.class_weight = iou_weight, class_weight
        self.low_quality_matches = low_quality_matches

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, iou_threshold={self.iou_threshold}, iou_weight={self.iou_weight}, "
            f"class_weight={self.class_weight}, low_quality_matches={self.low_quality_matches}, "
            f"classification={self.classification!r}"
        )

    def quality(
        self, pred_logits: Tensor, pred_boxes: Tensor, labels: Tensor, boxes: Tensor
    ) -> Tensor:
        """Rule 1, gt-major: ``Tensor[B, N, Q]`` (fresh) from ``pred_logits (Tensor[B, Q, K])``,
        ``pred_boxes (Tensor[B, Q, 4])``, padded ``labels (Tensor[B, N])`` and ``boxes
        (Tensor[B, N, 4])``."""
        return self._quality(pred_logits, pred_boxes, labels, boxes).clone()

    def _quality(self, pred_logits, pred_boxes, labels, boxes) -> Tensor:
        """Rule 1 gt-chunk by gt-chunk (a workspace view when it fits in one chunk)."""
        b, q, _ = pred_logits.shape
        n = labels.shape[1]
        dtype = working_dtype(pred_boxes)
        pred_logits, pred_boxes, boxes = (x.to(dtype) for x in (pred_logits, pred_boxes, boxes))
        pred_xyxy = xyxy(pred_boxes)
        softmax = self.classification == "softmax"
        lse = pred_logits.logsumexp(-1, keepdim=True) if softmax else None

        def fill(bufs: list[Tensor], rows: slice) -> None:
            quality, s0, s1 = bufs
            iou_block(xyxy(boxes[:, rows]), pred_xyxy, quality, [s0, s1], giou=False)
            lab = labels[:, rows]
            prob = gather_logits(pred_logits, lab, s0.view(b, q, lab.shape[1]))
            prob = prob.sub_(lse).exp_() if softmax else prob.sigmoid_()
            quality.mul_(self.iou_weight).add_(prob.transpose(1, 2), alpha=self.class_weight)

        return fill_blocks(self._workspace, 3, (b, n, q), dtype, pred_boxes.device, fill)

    _plans = True  # this class is matched through match_all (see batch.plannable)

    def plan(self, logits: Tensor, pboxes: Tensor, padded, batch: int) -> Plan:
        """Rules 2-5 on the device for stacked problems ``logits (Tensor[S*B, Q, K])``,
        ``pboxes (Tensor[S*B, Q, 4])`` against ``padded`` targets (``[S*B, N]``), ``batch = B``,
        with fixed-size tensors only (no data-dependent shapes, no host read). The host gets
        each gt's ranked predictions ``Tensor[S*B, N, kk]``, their counts ``Tensor[S*B, N]`` and
        a non-finite flag per image; the plan's ``finish`` lists the pairs."""
        b, q, _ = logits.shape
        labels, boxes, mask = padded.labels, padded.boxes, padded.mask
        n = labels.shape[1]
        quality = self._quality(logits, pboxes, labels, boxes)  # [B, N, Q]
        # NaN anywhere in a real gt's row makes its sum NaN (quality is in [0, 1] or NaN)
        non_finite = (~torch.isfinite(quality.sum(2)) & mask).any(1)  # [B]
        if min(padded.sizes) < n:
            quality.masked_fill_(~mask[:, :, None], float("-inf"))
        kk = min(self.k, q)
        order = ranked(quality, kk)  # [B, N, kk]: decreasing quality, lower index first on ties
        # Rule 2: positives; rule 3: each real gt's best prediction (rank 0) is positive too.
        positive = quality.amax(dim=1) >= self.iou_threshold  # [B, Q]
        if self.low_quality_matches:
            hits = torch.zeros(b, q, dtype=torch.int64, device=logits.device)
            positive |= hits.scatter_add_(1, order[:, :, 0], mask.long()) > 0
        # Rule 4: the best gt of every prediction (first index among ties), counted per gt
        # over the positives.
        best_gt = quality.argmax(dim=1)  # [B, Q]
        count = torch.zeros(b, n, dtype=torch.int64, device=logits.device)
        count = count.scatter_add_(1, best_gt, positive.long()).clamp_(max=kk)
        who, sizes = type(self).__name__, padded.sizes

        def finish(host: list) -> list:
            order_h, count_h, bad = host
            if bad.any():
                what = "matching quality is not finite"
                raise_non_finite(list(np.flatnonzero(bad)), batch, logits, pboxes, who, what)
            # Rule 5: each gt's count best predictions, ordered by image, gt, rank.
            selected = np.arange(kk) < count_h[:, :, None]  # [B, N, kk]
            out = []
            for i, n_i in enumerate(sizes):
                gt = np.nonzero(selected[i, :n_i])[0].astype(np.int64)
                out.append((order_h[i, :n_i][selected[i, :n_i]].astype(np.int64), gt))
            return out

        return Plan([order, count, non_finite], finish)


def ranked(quality: Tensor, kk: int) -> Tensor:
    """Indices of the ``kk`` best predictions of every gt, ``Tensor[B, N, kk]`` from ``quality
    (Tensor[B, N, Q])``: decreasing quality, ties to the lower index (a stable sort's order).

    float32 (and lower) quality is ranked by one ``topk`` of exact int64 keys (the value's
    order-preserving bit pattern above the reversed index), so ties need no second pass;
    float64 by a stable sort.
    """
    if quality.dtype == torch.float64:
        return quality.sort(dim=2, descending=True, stable=True).indices[:, :, :kk]
    bits = (quality.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 -> +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float's value
    low = 2**32 - 1 - torch.arange(quality.shape[2], device=quality.device)
    keys = bits * 2**32 + low
    top = keys.topk(kk, dim=2).values
    return (2**32 - 1) - (top & (2**32 - 1))
