"""H-DETR's hybrid matching: Hungarian assignment against the gts repeated ``k`` times."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .hungarian import HungarianMatcher, MatchIndices
from .inputs import PackedTargets, check_predictions, pack_targets

__all__ = ["RepeatedGTMatcher"]


class RepeatedGTMatcher(HungarianMatcher):
    """One-to-many matching of H-DETR: each image's gts are repeated ``k`` times and matched
    one-to-one (Hungarian, same costs and arguments as :class:`HungarianMatcher`) to the
    predictions, so every gt gets up to ``k`` predictions and each prediction at most one gt.

    Call ``matcher(outputs, targets)`` with ``outputs = {"pred_logits": Tensor[B, Q, K],
    "pred_boxes": Tensor[B, Q, 4]}`` and ``targets`` a list of ``B`` dicts ``{"labels":
    Tensor[N_b], "boxes": Tensor[N_b, 4]}``. Returns per image ``(pred_idx, gt_idx)``, int64
    ``Tensor[min(Q, k * N_b)]`` on the predictions' device, sorted by ``pred_idx``; ``gt_idx``
    indexes the original (not repeated) gts, in ``[0, N_b)``.
    """

    supervision = "o2m"

    def __init__(self, k: int = 6, **hungarian_kwargs) -> None:
        super().__init__(**hungarian_kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"RepeatedGTMatcher: k must be an int >= 1, received {k!r}")
        self.k = k

    def extra_repr(self) -> str:
        return f"k={self.k}, " + super().extra_repr()

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping]) -> MatchIndices:
        """Match; see the class docstring for shapes."""
        who = type(self).__name__
        logits, pboxes = check_predictions(outputs, who)
        packed = pack_targets(targets, logits.shape[0], logits.shape[2], pboxes, who)
        labels = [x.repeat(self.k) for x in packed.labels.split(packed.sizes)]
        boxes = [x.repeat(self.k, 1) for x in packed.boxes.split(packed.sizes)]
        repeated = PackedTargets(
            torch.cat(labels) if labels else packed.labels,
            torch.cat(boxes) if boxes else packed.boxes,
            [self.k * n for n in packed.sizes],
        )
        indices = self.match_packed(logits, pboxes, repeated)
        return [(p, g % max(n, 1)) for (p, g), n in zip(indices, packed.sizes, strict=True)]
