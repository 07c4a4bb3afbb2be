"""H-DETR's hybrid matching: Hungarian assignment against the gts repeated ``k`` times."""

from __future__ import annotations

from torch import Tensor

from .hungarian import HungarianMatcher
from .indices import MatchIndices
from .inputs import PackedTargets

__all__ = ["RepeatedGTMatcher"]


class RepeatedGTMatcher(HungarianMatcher):
    """One-to-many matching of H-DETR: each image's gts are repeated ``k`` times and matched
    one-to-one (Hungarian, same costs and arguments as :class:`HungarianMatcher`) to the
    predictions, so every gt gets up to ``k`` predictions and each prediction at most one gt.

    The cost block is computed once for the original gts; only the solver sees it repeated
    (exact copies), so the cost computation and its scratch memory do not grow with ``k``.

    Call ``matcher(outputs, targets)`` with ``outputs = {"pred_logits": Tensor[B, Q, K],
    "pred_boxes": Tensor[B, Q, 4]}`` and ``targets`` a list of ``B`` dicts ``{"labels":
    Tensor[N_b], "boxes": Tensor[N_b, 4]}``. Returns per image ``(pred_idx, gt_idx)``, int64
    ``Tensor[min(Q, k * N_b)]`` on the predictions' device, sorted by ``pred_idx``; ``gt_idx``
    indexes the original (not repeated) gts, in ``[0, N_b)``.
    """

    def __init__(self, k: int = 6, **hungarian_kwargs) -> None:
        super().__init__(**hungarian_kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"RepeatedGTMatcher: k must be an int >= 1, received {k!r}")
        self.k = k

    def extra_repr(self) -> str:
        return f"k={self.k}, " + super().extra_repr()

    _plans = True  # this class is matched through match_all (see batch.plannable)

    def plan(self, logits: Tensor, pboxes: Tensor, padded, batch: int, repeat: int = 1):
        """:meth:`HungarianMatcher.plan` with the gts repeated ``k * repeat`` times."""
        return super().plan(logits, pboxes, padded, batch, self.k * repeat)

    def match_packed(
        self, logits: Tensor, pboxes: Tensor, packed: PackedTargets, repeat: int = 1
    ) -> MatchIndices:
        """:meth:`HungarianMatcher.match_packed` with the gts repeated ``k * repeat`` times."""
        return super().match_packed(logits, pboxes, packed, self.k * repeat)
