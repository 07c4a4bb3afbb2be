"""Input validation for ``ms_deform_attn``: every check runs before any kernel, on every backend.

The level checks read host integers: the caller's ``spatial_shapes_list`` (no device read at
all), or, without it, one device-to-host copy of both level tensors per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

HostShapes = list[tuple[int, int]]


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    spatial_shapes_list: HostShapes | None = None,
) -> HostShapes | None:
    """Raise ``TypeError``/``ValueError`` naming the argument when the op's inputs are inconsistent.

    Shapes: value ``[B, S, H, D]``, spatial_shapes ``[L, 2]`` int64, level_start_index ``[L]``
    int64, sampling_locations ``[B, Q, H, L, P, 2]``, attention_weights ``[B, Q, H, L, P]``;
    ``spatial_shapes_list`` the same levels as ``L`` host ``(h, w)`` pairs.

    Returns:
        The level shapes as host integers, checked (from ``spatial_shapes_list`` without any
        device read, else read once from the tensors), or None under ``torch.compile`` with
        tensors only (no read there; the kernels' bounds safety still holds).
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
    # under autocast the op's autocast rule (_autocast.py) casts the three to one dtype
    mixed_ok = value.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(value.device.type)
    for name in ("sampling_locations", "attention_weights"):
        if mixed_ok and named[name].dtype in _FLOATS:
            continue
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
    if spatial_shapes_list is not None:
        shapes = host_shapes(spatial_shapes_list, num_levels)
        _check_sizes(shapes, s, "spatial_shapes_list")
        return shapes
    if torch.compiler.is_compiling():
        return None
    return _read_levels(spatial_shapes, level_start_index, s)


def host_shapes(spatial_shapes_list: Sequence, num_levels: int) -> HostShapes:
    """``spatial_shapes_list`` as ``L`` host ``(h, w)`` pairs, else ``TypeError``/``ValueError``."""
    if isinstance(spatial_shapes_list, Tensor) or not isinstance(spatial_shapes_list, Sequence):
        raise TypeError(
            "ms_deform_attn: spatial_shapes_list must be a list of (h, w) int pairs, got "
            f"{type(spatial_shapes_list).__name__}"
        )
    ints = (int, torch.SymInt)
    shapes = []
    for pair in spatial_shapes_list:
        ok = isinstance(pair, Sequence) and not isinstance(pair, (str, Tensor)) and len(pair) == 2
        if not ok or not all(isinstance(x, ints) and not isinstance(x, bool) for x in pair):
            raise TypeError(
                "ms_deform_attn: spatial_shapes_list must be a list of (h, w) int pairs, got "
                f"an element {pair!r}"
            )
        shapes.append((pair[0], pair[1]))
    if len(shapes) != num_levels:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes_list must have L={num_levels} levels (L from "
            f"spatial_shapes and sampling_locations), got {len(shapes)}"
        )
    return shapes


def _read_levels(spatial_shapes: Tensor, level_start_index: Tensor, s: int) -> HostShapes:
    """Value checks of the level tensors, read on the host at every call (one copy of both).

    There is deliberately no cache keyed by data pointer and ``_version``: a reused numpy
    buffer, a write through ``.data`` or an ``as_strided`` view changes the values without
    changing either, and inference tensors have no version counter at all. Memory safety does
    not rest on this check: the kernels never read outside ``value`` whatever the level tensors
    hold (``csrc/ms_deform_attn/ms_deform_attn.h``, ``safe_level``), so calls that skip it
    (``torch.compile``, ``torch.ops.mrdetr.*``, ``spatial_shapes_list``) stay safe.
    """
    num_levels = spatial_shapes.shape[0]
    both = torch.cat([spatial_shapes.reshape(-1), level_start_index]).tolist()
    shapes = [(both[2 * i], both[2 * i + 1]) for i in range(num_levels)]
    starts = both[2 * num_levels :]
    if any(hh <= 0 or ww <= 0 for hh, ww in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive, got {shapes}")
    sizes = [hh * ww for hh, ww in shapes]
    expected = [sum(sizes[:i]) for i in range(len(sizes))]
    if starts != expected:
        raise ValueError(
            "ms_deform_attn: level_start_index must be the running sum of h*w from "
            f"spatial_shapes, expected {expected}, got {starts}"
        )
    _check_sizes(shapes, s, "spatial_shapes")
    return shapes


def _check_sizes(shapes: HostShapes, s: int, name: str) -> None:
    if any(hh <= 0 or ww <= 0 for hh, ww in shapes):
        raise ValueError(f"ms_deform_attn: {name} must be positive, got {shapes}")
    total = sum(hh * ww for hh, ww in shapes)
    if total != s:
        raise ValueError(
            f"ms_deform_attn: value has S={s} positions but {name} sum to sum(h*w)={total}"
        )
