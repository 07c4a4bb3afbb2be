"""Pure-PyTorch multi-scale deformable attention: the fallback backend and the test oracle."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["ms_deform_attn_reference"]


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    spatial_shapes_list: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Multi-scale deformable attention written with ``F.grid_sample``.

    This is the equivalent PyTorch code of the compiled kernels (the same math as the
    ``ms_deform_attn_core_pytorch`` function that Deformable-DETR ships beside its CUDA op):
    for every query ``q``, head ``h``, level ``l`` and point ``p`` it samples the level's value
    map bilinearly (zero padding, ``align_corners=False``) at ``sampling_locations[b, q, h, l, p]``
    and sums the samples weighted by ``attention_weights[b, q, h, l, p]``.

    It differentiates through autograd, runs on any device and dtype, and needs no compiler,
    which makes it both the fallback backend and the oracle the kernels are tested against. It
    is slow: each level's value map is re-laid out as ``[B*H, D, h, w]`` and the samples of every
    point are materialised before they are summed.

    Args:
        value (Tensor[B, S, H, D]): flattened multi-level value maps, ``S = sum(h * w)``.
        spatial_shapes (Tensor[L, 2], int64): ``(h, w)`` of every level.
        level_start_index (Tensor[L], int64): offset of every level in ``S``
            (unused here: levels are split by ``spatial_shapes``; kept for the op's signature).
        sampling_locations (Tensor[B, Q, H, L, P, 2]): ``(x, y)`` in ``[0, 1]``; points outside
            (``+-inf`` included) sample zeros, a NaN point samples NaN.
        attention_weights (Tensor[B, Q, H, L, P]): weight of every sample.
        spatial_shapes_list: the same levels as host ``(h, w)`` integers; without it
            ``spatial_shapes`` is read on the host (a device-to-host copy).

    Returns:
        Tensor[B, Q, H * D]
    """
    del level_start_index  # the split sizes below carry the same information
    b, _, h, d = value.shape
    _, q, _, num_levels, num_points, _ = sampling_locations.shape
    if spatial_shapes_list is None:
        spatial_shapes_list = spatial_shapes.tolist()
    shapes = [(hh, ww) for hh, ww in spatial_shapes_list]
    value_levels = value.split([hh * ww for hh, ww in shapes], dim=1)
    # A point is outside level l when its pixel coordinate x = loc_x * w - 0.5 is <= -1 or >= w,
    # i.e. loc_x <= -0.5 / w or loc_x >= 1 + 0.5 / w (same for y with h). Clamping every location
    # into that band keeps +-inf and huge values (2 * 3e38 overflows fp32) from reaching
    # grid_sample, which turns them into NaN, and gives every outside point a zero location
    # gradient, as the kernels do. NaN passes through unchanged so that it propagates.
    margin = 0.5 / spatial_shapes.flip(-1).to(sampling_locations)[:, None]  # [L, 1, 2]: (x, y)
    clamped = sampling_locations.clamp(-margin, 1 + margin)
    locs = torch.where(sampling_locations.isnan(), sampling_locations, clamped)
    grids = 2 * locs - 1  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (hh, ww) in enumerate(shapes):
        v = rearrange(value_levels[lvl], "b (y x) h d -> (b h) d y x", y=hh, x=ww)
        g = rearrange(grids[:, :, :, lvl], "b q h p two -> (b h) q p two")
        samples.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [(B*H), D, Q, P] each
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # [(B*H), D, Q, L*P]
    weights = rearrange(attention_weights, "b q h l p -> (b h) 1 q (l p)")
    out = (stacked * weights).sum(-1)  # [(B*H), D, Q]
    return rearrange(out, "(b h) d q -> b q (h d)", b=b, h=h, d=d)
