"""``MaskHungarianMatcher``: the Hungarian matcher with mask BCE and dice costs added."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ..matching.hungarian import HungarianMatcher, MatchIndices, solve_blocks
from ..matching.inputs import PackedTargets
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

    def extra_inputs(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping], packed: PackedTargets
    ) -> dict:
        """``{"pred_masks": Tensor[B, Q, h, w], "target_masks": [Tensor[N_b, H, W] or None]}``
        (detached, validated), or nothing without ``"pred_masks"`` in ``outputs``."""
        pred_masks = outputs.get("pred_masks")
        if pred_masks is None:
            return {}
        who = type(self).__name__
        b, q = outputs["pred_logits"].shape[:2]
        is_tensor = isinstance(pred_masks, Tensor)
        if not is_tensor or pred_masks.dim() != 4 or tuple(pred_masks.shape[:2]) != (b, q):
            got = tuple(pred_masks.shape) if is_tensor else type(pred_masks).__name__
            raise ValueError(
                f"{who}: outputs['pred_masks'] must be [B, Q, h, w] with [B, Q]={[b, q]}, "
                f"received {got}"
            )
        target_masks = []
        for i, (t, n) in enumerate(zip(targets, packed.sizes, strict=True)):
            masks = t.get("masks") if n else None
            if n and (not isinstance(masks, Tensor) or masks.dim() != 3 or masks.shape[0] != n):
                got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
                raise ValueError(f"{who}: image {i}: 'masks' must be [N={n}, H, W], received {got}")
            target_masks.append(masks)
        return {"pred_masks": pred_masks.detach(), "target_masks": target_masks}

    def match_packed(
        self, logits: Tensor, pboxes: Tensor, packed: PackedTargets, repeat: int = 1, *,
        pred_masks: Tensor | None = None, target_masks: list | None = None,
    ) -> MatchIndices:  # fmt: skip
        """:meth:`HungarianMatcher.match_packed` with the mask costs added when ``pred_masks
        (Tensor[B, Q, h, w])`` and ``target_masks`` (per image ``Tensor[N_b, H, W]`` or None)
        are given (see :meth:`extra_inputs`)."""
        if pred_masks is None:
            return super().match_packed(logits, pboxes, packed, repeat)
        labels, boxes, _ = packed.padded()
        cost = self.cost_matrix(logits, pboxes, labels, boxes)  # [B, N, Q]
        for i, (masks, n) in enumerate(zip(target_masks, packed.sizes, strict=True)):
            if n:
                bce, dice = pairwise_mask_costs(pred_masks[i], masks, self.num_points)
                cost[i, :n] += (self.cost_mask * bce + self.cost_dice * dice).T.to(cost.dtype)
        cost = cost.float().cpu().numpy()  # [B, N, Q]: gt-major, as scipy wants
        who = type(self).__name__
        return solve_blocks(cost, packed.sizes, logits.device, logits, pboxes, who, repeat)
