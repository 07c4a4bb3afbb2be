"""``MaskHungarianMatcher``: the Hungarian matcher with mask BCE and dice costs added."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..matching.base import single_thread
from ..matching.hungarian import HungarianMatcher, MatchIndices, empty_indices, solve_blocks
from ..matching.inputs import check_predictions, pack_targets
from .losses import pairwise_mask_costs

__all__ = ["MaskHungarianMatcher"]


class MaskHungarianMatcher(HungarianMatcher):
    """One-to-one matcher whose cost also compares masks (Mask2Former-style).

    ``C = HungarianMatcher's cost + cost_mask * BCE + cost_dice * dice``, the mask terms computed
    by :func:`~mrdetr.segmentation.losses.pairwise_mask_costs` on ``num_points`` uniform points
    per image. Without ``"pred_masks"`` in the outputs it is exactly :class:`HungarianMatcher`.

    Args:
        cost_mask, cost_dice: weights of the mask terms (>= 0).
        num_points: points per image for the mask costs.
        **kwargs: :class:`HungarianMatcher`'s arguments (``cost_class``, ``cost_bbox``, ...).

    Call with ``outputs`` holding ``"pred_masks": Tensor[B, Q, h, w]`` (logits) and targets
    holding ``"masks": Tensor[N_b, H, W]`` (bool); returns :class:`HungarianMatcher`'s pairs.
    """

    def __init__(
        self, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if cost_mask < 0 or cost_dice < 0:
            raise ValueError(
                f"MaskHungarianMatcher: cost_mask and cost_dice must be >= 0, received "
                f"{cost_mask!r} and {cost_dice!r}"
            )
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(
                f"MaskHungarianMatcher: num_points must be an int >= 1, received {num_points!r}"
            )
        self.cost_mask, self.cost_dice, self.num_points = cost_mask, cost_dice, num_points

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping]) -> MatchIndices:
        """Match; see the class docstring for shapes."""
        if outputs.get("pred_masks") is None:
            return super().forward(outputs, targets)
        who = type(self).__name__
        logits, pboxes = check_predictions(outputs, who)
        b, q, k = logits.shape
        packed = pack_targets(targets, b, k, pboxes, who)
        pred_masks = outputs["pred_masks"]
        if pred_masks.dim() != 4 or tuple(pred_masks.shape[:2]) != (b, q):
            raise ValueError(
                f"{who}: outputs['pred_masks'] must be [B, Q, h, w] with [B, Q]={[b, q]}, "
                f"received {tuple(pred_masks.shape)}"
            )
        if packed.max_size == 0 or q == 0:
            return [empty_indices(logits.device) for _ in range(b)]
        with single_thread(logits.device):  # the matchers' threading rule (matching/base.py)
            cost = self._mask_cost(logits.detach(), pboxes.detach(), pred_masks, packed, targets)
            return solve_blocks(
                cost.float().cpu().numpy(), packed.sizes, logits.device, logits, pboxes, who
            )

    def _mask_cost(self, logits, pboxes, pred_masks, packed, targets) -> Tensor:
        """``[B, N, Q]``: the box/class cost plus the weighted mask BCE and dice costs."""
        who = type(self).__name__
        labels, boxes, _ = packed.padded()
        cost = self.cost_matrix(logits, pboxes, labels, boxes)  # [B, N, Q]
        for i, t in enumerate(targets):
            n = packed.sizes[i]
            if n == 0:
                continue
            masks = t.get("masks")
            if not isinstance(masks, Tensor) or masks.dim() != 3 or masks.shape[0] != n:
                got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
                raise ValueError(f"{who}: image {i}: 'masks' must be [N={n}, H, W], received {got}")
            bce, dice = pairwise_mask_costs(pred_masks[i].detach(), masks, self.num_points)
            cost[i, :n] += (self.cost_mask * bce + self.cost_dice * dice).T.to(cost.dtype)
        return cost
