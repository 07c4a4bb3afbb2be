"""Input validation for ``ms_deform_attn``: every check runs before any kernel, on every backend."""

from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument when the op's inputs are inconsistent.

    Shapes: value ``[B, S, H, D]``, spatial_shapes ``[L, 2]`` int64, level_start_index ``[L]``
    int64, sampling_locations ``[B, Q, H, L, P, 2]``, attention_weights ``[B, Q, H, L, P]``.
    """
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a Tensor, got {type(t).__name__}")
    ranks = {"value": 4, "spatial_shapes": 2, "level_start_index": 1}
    ranks |= {"sampling_locations": 6, "attention_weights": 5}
    for name, rank in ranks.items():
        if named[name].dim() != rank:
            raise ValueError(
                f"ms_deform_attn: {name} must have {rank} dims, got shape {_shape(named[name])}"
            )
    if value.dtype not in _FLOATS:
        raise TypeError(f"ms_deform_attn: value must be a floating tensor, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].dtype != value.dtype:
            raise TypeError(
                f"ms_deform_attn: {name} must have value's dtype {value.dtype}, "
                f"got {named[name].dtype}"
            )
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {named[name].dtype}")
    for name, t in named.items():
        if t.device != value.device:
            raise ValueError(
                f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}; "
                "all inputs must be on one device"
            )

    b, s, h, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    if num_levels == 0:
        raise ValueError(
            "ms_deform_attn: spatial_shapes must have at least one level (L >= 1), got shape "
            f"{_shape(spatial_shapes)}"
        )
    if spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be [L, 2], got {_shape(spatial_shapes)}"
        )
    if level_start_index.shape[0] != num_levels:
        raise ValueError(
            f"ms_deform_attn: level_start_index must be [L]=[{num_levels}] "
            f"(L from spatial_shapes), got {_shape(level_start_index)}"
        )
    sl = sampling_locations.shape
    if sl[0] != b or sl[2] != h or sl[3] != num_levels or sl[5] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be [B, Q, H, L, P, 2] = "
            f"[{b}, Q, {h}, {num_levels}, P, 2], got {_shape(sampling_locations)}"
        )
    if attention_weights.shape != sl[:5]:
        raise ValueError(
            "ms_deform_attn: attention_weights must be [B, Q, H, L, P] = "
            f"{tuple(sl[:5])} (from sampling_locations), got {_shape(attention_weights)}"
        )
    if not torch.compiler.is_compiling():
        _check_levels(spatial_shapes, level_start_index, s)


def _check_levels(spatial_shapes: Tensor, level_start_index: Tensor, s: int) -> None:
    """Value checks of the level tensors, read on the host at every call.

    There is deliberately no cache keyed by data pointer and ``_version``: a reused numpy
    buffer, a write through ``.data`` or an ``as_strided`` view changes the values without
    changing either, and inference tensors have no version counter at all. The compiled kernels
    repeat the memory-safety part of this check in C++ (``inputs.h``), so even calls that skip
    it (``torch.compile``, ``torch.ops.mrdetr.*``) cannot read outside ``value``.
    """
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    sizes = [hh * ww for hh, ww in shapes]
    if any(hh <= 0 or ww <= 0 for hh, ww in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive, got {shapes}")
    expected = [sum(sizes[:i]) for i in range(len(sizes))]
    if starts != expected:
        raise ValueError(
            "ms_deform_attn: level_start_index must be the running sum of h*w from "
            f"spatial_shapes, expected {expected}, got {starts}"
        )
    if sum(sizes) != s:
        raise ValueError(
            f"ms_deform_attn: value has S={s} positions but spatial_shapes sum to "
            f"sum(h*w)={sum(sizes)}"
        )
