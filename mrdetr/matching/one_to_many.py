"""Deterministic one-to-many matcher of the DETA / DAC-DETR / MS-DETR family (Mr. DETR's o2m)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Matcher, working_dtype
from .costs import gather_logits, iou_block, xyxy
from .indices import MatchIndices
from .inputs import PackedTargets
from .solve import locate_non_finite
from .workspace import MAX_BYTES, fill_blocks

__all__ = ["OneToManyMatcher"]


class OneToManyMatcher(Matcher):
    """Assign each gt up to ``k`` predictions by matching quality, for the whole batch at once.

    The rules (per image; ``quality`` is computed from detached predictions):

    1. ``quality[q, g] = iou_weight * IoU(pred q, gt g) + class_weight * sigmoid(logit[q,
       label_g])``;
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
        workspace_bytes: int = MAX_BYTES,
    ) -> None:
        super().__init__(workspace_bytes=workspace_bytes)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"OneToManyMatcher: k must be an int >= 1, received {k!r}")
        self.k, self.iou_threshold = k, iou_threshold
        self.iou_weight, self.class_weight = iou_weight, class_weight
        self.low_quality_matches = low_quality_matches

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, iou_threshold={self.iou_threshold}, iou_weight={self.iou_weight}, "
            f"class_weight={self.class_weight}, low_quality_matches={self.low_quality_matches}"
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

        def fill(bufs: list[Tensor], rows: slice) -> None:
            quality, s0, s1 = bufs
            iou_block(xyxy(boxes[:, rows]), pred_xyxy, quality, [s0, s1], giou=False)
            lab = labels[:, rows]
            prob = gather_logits(pred_logits, lab, s0.view(b, q, lab.shape[1])).sigmoid_()
            quality.mul_(self.iou_weight).add_(prob.transpose(1, 2), alpha=self.class_weight)

        return fill_blocks(self._workspace, 3, (b, n, q), dtype, pred_boxes.device, fill)

    def match_packed(self, logits: Tensor, pboxes: Tensor, packed: PackedTargets) -> MatchIndices:
        """Rules 2-5 on validated predictions and packed targets (see :class:`Matcher`)."""
        who = type(self).__name__
        b, q, _ = logits.shape
        device = logits.device
        labels, boxes, mask = packed.padded()
        n = labels.shape[1]
        quality = self._quality(logits, pboxes, labels, boxes)  # [B, N, Q]
        # NaN anywhere in a real gt's row makes its sum NaN (quality is in [0, 1] or NaN)
        non_finite = (~torch.isfinite(quality.sum(2)) & mask).any(1)  # [B]
        if min(packed.sizes) < n:
            quality.masked_fill_(~mask[:, :, None], float("-inf"))
        kk = min(self.k, q)
        # each gt's kk + 1 best predictions, decreasing: rank 0 is rule 3's, ranks < kk rule 5's
        vals, order = quality.topk(min(kk + 1, q), dim=2)  # [B, N, kk(+1)]
        same = vals[:, :, 1:] == vals[:, :, :-1]  # exact ties between neighbouring ranks

        # Rule 2: positives; rule 3: each gt's best prediction (topk's rank 0, unless tied).
        positive = quality.amax(dim=1) >= self.iou_threshold  # [B, Q]
        lq_tie = torch.zeros((), dtype=torch.bool, device=device)
        if self.low_quality_matches:
            top_pred = order[:, :, 0]
            if same.shape[2]:
                lq_tie = (same[:, :, 0] & mask).any()
            if bool(non_finite.any() | lq_tie):  # sync; rare path: first index among ties
                top_pred = quality.argmax(dim=2)
            image = torch.arange(b, device=device)[:, None].expand(b, n)
            positive[image[mask], top_pred[mask]] = True
        # Rule 4: the best gt of each positive (first index among ties), counted per gt.
        pos_image, pos_pred = positive.nonzero(as_tuple=True)
        best_gt = quality[pos_image, :, pos_pred].argmax(dim=1)  # [P]
        count = torch.bincount(pos_image * n + best_gt, minlength=b * n).view(b, n)
        count = count.clamp_(max=kk)

        # Rule 5: ranks < count; a tie inside the selection falls back to a stable sort.
        cut = torch.arange(same.shape[2], device=device) < count[:, :, None]
        flags = torch.stack([non_finite.any(), (same & cut).any()]).long()
        stats = torch.cat([count.sum(1), flags]).tolist()
        per_image, (bad, ties) = stats[:b], stats[b:]
        if bad:
            bad_images = non_finite.nonzero()[:, 0].tolist()
            locate_non_finite(logits, pboxes, bad_images, who)
            raise ValueError(f"{who}: image {bad_images[0]}: matching quality is not finite")
        if ties:
            order = quality.sort(dim=2, descending=True, stable=True).indices
        order = order[:, :, :kk]  # [B, N, kk]
        selected = torch.arange(kk, device=device) < count[:, :, None]  # [B, N, kk]
        _, gt_idx, _ = selected.nonzero(as_tuple=True)  # ordered by image, gt, rank
        pred_idx = order[selected]
        return list(zip(pred_idx.split(per_image), gt_idx.split(per_image), strict=True))
