"""Point-sampled mask losses: sigmoid BCE and dice on points chosen by uncertainty.

Instead of comparing whole mask maps, the losses compare predicted logits and gt masks at ``P``
points per mask (PointRend / Mask2Former's recipe): ``oversample_ratio * P`` random points are
drawn, the ``importance_ratio * P`` most *uncertain* of them (logit closest to 0) are kept, and
the rest of the ``P`` points are fresh uniform random points. Values at a point are read with
``torch.nn.functional.grid_sample`` (bilinear, ``align_corners=False``, border padding), so
predictions and gt masks may have different resolutions: points live in normalised ``[0, 1]``
coordinates. With ``num_points=None`` the points are every pixel centre of the gt grid, which is
exactly the dense loss on the prediction bilinearly resized to the gt size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MaskLoss",
    "dice_loss",
    "grid_points",
    "mask_losses",
    "pairwise_mask_costs",
    "point_sample",
    "sample_points",
    "sigmoid_bce_loss",
]


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of ``maps (Tensor[M, H, W])`` at ``points (Tensor[M, P, 2])`` (``(x, y)``
    in ``[0, 1]``, pixel centres at ``(j + 0.5) / W``) -> ``Tensor[M, P]``; border padding."""
    grid = (2.0 * points - 1.0)[:, :, None]  # [M, P, 1, 2] in [-1, 1]
    out = F.grid_sample(
        maps[:, None].to(points.dtype), grid, mode="bilinear", padding_mode="border",
        align_corners=False,
    )  # fmt: skip
    return out[:, 0, :, 0]  # [M, P]


def grid_points(height: int, width: int, m: int, like: Tensor) -> Tensor:
    """Every pixel centre of a ``height x width`` grid, for ``m`` masks: ``Tensor[m, H*W, 2]``."""
    ys = (torch.arange(height, dtype=like.dtype, device=like.device) + 0.5) / height
    xs = (torch.arange(width, dtype=like.dtype, device=like.device) + 0.5) / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx, yy), -1).reshape(1, -1, 2).expand(m, -1, -1)  # [m, H*W, 2]


@torch.no_grad()
def sample_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uncertainty-based importance sampling of ``num_points`` points per mask.

    Args:
        logits (Tensor[M, H, W]): predicted mask logits (uncertainty = ``-|logit|``).
        num_points: ``P``.
        oversample_ratio: ``k >= 1``: ``k * P`` candidate points are drawn uniformly.
        importance_ratio: ``beta`` in ``[0, 1]``: ``int(beta * P)`` points are the most uncertain
            candidates, the other ``P - int(beta * P)`` are fresh uniform points.
        generator: optional random generator.

    Returns:
        Tensor[M, P, 2]: ``(x, y)`` in ``[0, 1]``.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be an int >= 1, received {num_points!r}")
    if not oversample_ratio >= 1:
        raise ValueError(f"oversample_ratio must be >= 1, received {oversample_ratio!r}")
    if not 0 <= importance_ratio <= 1:
        raise ValueError(f"importance_ratio must be in [0, 1], received {importance_ratio!r}")
    m = logits.shape[0]
    dtype = logits.dtype if logits.is_floating_point() else torch.float32
    kw = dict(dtype=dtype, device=logits.device, generator=generator)
    n_cand = int(num_points * oversample_ratio)
    n_imp = int(importance_ratio * num_points)
    cand = torch.rand(m, n_cand, 2, **kw)
    uncertainty = -point_sample(logits, cand).abs()  # [M, kP]
    top = uncertainty.topk(n_imp, dim=1).indices  # [M, beta*P]
    picked = torch.gather(cand, 1, top[..., None].expand(-1, -1, 2))
    rand = torch.rand(m, num_points - n_imp, 2, **kw)
    return torch.cat([picked, rand], 1)


def sigmoid_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE over the last axis: ``logits``, ``targets (Tensor[M, P])`` -> ``[M]``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)


def dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """``1 - (2 sum(p t) + s) / (sum p + sum t + s)`` with ``p = sigmoid(logits)``, over the last
    axis of ``logits``, ``targets (Tensor[M, P])`` -> ``Tensor[M]``."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(-1) + smooth) / (p.sum(-1) + targets.sum(-1) + smooth)


def _check_pair(pred: Tensor, target: Tensor, who: str) -> None:
    if not isinstance(pred, Tensor) or pred.dim() != 3 or not pred.is_floating_point():
        got = f"{pred.dtype} {tuple(pred.shape)}" if isinstance(pred, Tensor) else type(pred)
        raise ValueError(f"{who}: pred_masks must be floating logits [M, h, w], received {got}")
    if not isinstance(target, Tensor) or target.dim() != 3:
        got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"{who}: target_masks must be [M, H, W], received {got}")


def mask_losses(
    pred_masks: Tensor,
    target_masks: Tensor,
    num_points: int | None = 12544,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Point-sampled sigmoid BCE and dice of matched mask pairs.

    Args:
        pred_masks (Tensor[M, h, w]): mask logits of the matched predictions.
        target_masks (Tensor[M, H, W]): their gt masks (bool or float in ``[0, 1]``), any size.
        num_points: points per mask (default 112 * 112, Mask2Former's); None = every pixel
            centre of the gt grid (the dense loss).
        oversample_ratio, importance_ratio, generator: see :func:`sample_points`.

    Returns:
        ``(bce, dice)``, each ``Tensor[M]`` (one value per mask; the caller reduces).
    """
    _check_pair(pred_masks, target_masks, "mask_losses")
    if pred_masks.shape[0] != target_masks.shape[0]:
        raise ValueError(
            f"mask_losses: pred_masks and target_masks must hold the same number of masks, "
            f"received {pred_masks.shape[0]} and {target_masks.shape[0]}"
        )
    if pred_masks.shape[0] == 0:
        zero = pred_masks.sum(dim=(1, 2))  # keeps the graph
        return zero, zero
    target = target_masks.to(pred_masks.dtype)
    if num_points is None:
        points = grid_points(*target.shape[-2:], target.shape[0], pred_masks)
    else:
        points = sample_points(
            pred_masks.detach(), num_points, oversample_ratio, importance_ratio, generator
        )
    point_logits = point_sample(pred_masks, points)  # [M, P]
    with torch.no_grad():
        point_labels = point_sample(target, points)
    return sigmoid_bce_loss(point_logits, point_labels), dice_loss(point_logits, point_labels)


@torch.no_grad()
def pairwise_mask_costs(
    pred_masks: Tensor,
    target_masks: Tensor,
    num_points: int = 12544,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BCE and dice of every prediction against every gt, on ``num_points`` uniform points shared
    by all of them (for a matcher).

    Args:
        pred_masks (Tensor[Q, h, w]): mask logits.
        target_masks (Tensor[N, H, W]): gt masks.

    Returns:
        ``(bce, dice)``, each ``Tensor[Q, N]``.
    """
    _check_pair(pred_masks, target_masks, "pairwise_mask_costs")
    q, n = pred_masks.shape[0], target_masks.shape[0]
    dtype = pred_masks.dtype
    pts = torch.rand(1, num_points, 2, dtype=dtype, device=pred_masks.device, generator=generator)
    x = point_sample(pred_masks, pts.expand(q, -1, -1))  # [Q, P]
    t = point_sample(target_masks.to(dtype), pts.expand(n, -1, -1))  # [N, P]
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    bce = (pos @ t.T + neg @ (1 - t).T) / num_points  # [Q, N]
    p = x.sigmoid()
    dice = 1 - (2 * p @ t.T + 1) / (p.sum(-1, keepdim=True) + t.sum(-1)[None] + 1)
    return bce, dice


class MaskLoss:
    """The mask-loss plug-in of :class:`mrdetr.MultiRouteCriterion` (its ``mask_loss``).

    ``loss(pred_masks (Tensor[M, h, w]), target_masks (Tensor[M, H, W])) -> (bce (Tensor[M]),
    dice (Tensor[M]))``: :func:`mask_losses` with the stored arguments.

    Args:
        num_points: points per mask (None: every gt pixel, the dense loss).
        oversample_ratio, importance_ratio: see :func:`sample_points`.
    """

    def __init__(
        self,
        num_points: int | None = 12544,
        oversample_ratio: float = 3.0,
        importance_ratio: float = 0.75,
    ) -> None:
        if num_points is not None and (
            isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1
        ):
            raise ValueError(
                f"MaskLoss: num_points must be an int >= 1 or None, got {num_points!r}"
            )
        if not oversample_ratio >= 1:
            raise ValueError(f"MaskLoss: oversample_ratio must be >= 1, got {oversample_ratio!r}")
        if not 0 <= importance_ratio <= 1:
            raise ValueError(
                f"MaskLoss: importance_ratio must be in [0, 1], got {importance_ratio!r}"
            )
        self.num_points = num_points
        self.oversample_ratio, self.importance_ratio = oversample_ratio, importance_ratio

    def __repr__(self) -> str:
        return (
            f"MaskLoss(num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_ratio={self.importance_ratio})"
        )

    def __call__(self, pred_masks: Tensor, target_masks: Tensor) -> tuple[Tensor, Tensor]:
        """Per-mask ``(bce, dice)``, each ``Tensor[M]``."""
        return mask_losses(
            pred_masks, target_masks, self.num_points, self.oversample_ratio, self.importance_ratio
        )
