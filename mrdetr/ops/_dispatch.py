"""Public ``ms_deform_attn`` op: validation, then dispatch to a compiled kernel or the reference."""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import _build
from ._checks import check_inputs
from ._reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "BACKENDS"]

BACKENDS = ("auto", "pytorch", "cpu", "cuda")
ENV_VAR = "MRDETR_BACKEND"
_warned: set[str] = set()


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention (Deformable-DETR's op, without ``im2col_step``).

    For every batch ``b``, query ``q`` and head ``h``::

        out[b, q, h*D:(h+1)*D] = sum_{l, p} attention_weights[b, q, h, l, p]
                                 * bilinear(value[b, level l, h], sampling_locations[b, q, h, l, p])

    with zero padding outside the map and ``align_corners=False`` pixel centres.
    :func:`ms_deform_attn_reference` is the equivalent PyTorch code.

    Args:
        value (Tensor[B, S, H, D]): flattened multi-level value maps, ``S = sum(h * w)``.
        spatial_shapes (Tensor[L, 2], int64): ``(h, w)`` of every level.
        level_start_index (Tensor[L], int64): offset of every level in ``S``.
        sampling_locations (Tensor[B, Q, H, L, P, 2]): normalised ``(x, y)``; ``[0, 1]`` spans
            the map, points outside (``+-inf`` included) sample zeros, a NaN point makes its
            output row NaN (see docs/ops.md, "Non-finite input").
        attention_weights (Tensor[B, Q, H, L, P]): weight of every sample.
        backend: ``"auto"`` (compiled kernel for the inputs' device, building it on first use,
            else the reference with one warning saying why), ``"pytorch"`` (the reference),
            ``"cpu"`` or ``"cuda"`` (that kernel or a ``RuntimeError`` saying why not). With
            ``"auto"``, the environment variable ``MRDETR_BACKEND`` picks instead when set.

    Returns:
        Tensor[B, Q, H * D] in value's dtype (fp16/bf16 accumulate in fp32 in the kernels).

    Raises:
        TypeError / ValueError: inconsistent inputs, naming the argument (before any kernel).
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = _resolve_backend(backend, value.device.type)
    if chosen == "pytorch":
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return torch.ops.mrdetr.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device_type: str) -> str:
    """Name the backend that runs (``"pytorch"``, ``"cpu"`` or ``"cuda"``), building on demand.

    Under ``torch.compile`` this runs once at trace time and its answer is a constant.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and os.environ.get(ENV_VAR):
        backend = os.environ[ENV_VAR].strip().lower()
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "pytorch":
        return "pytorch"
    if backend == "auto":
        if device_type not in ("cpu", "cuda"):
            return "pytorch"
        ok, reason = _build.load(device_type)
        if ok:
            return device_type
        if device_type not in _warned:
            _warned.add(device_type)
            warnings.warn(
                f"mrdetr: the compiled {device_type} ms_deform_attn kernel is not available "
                f"({reason}); using the PyTorch reference (slower). Set {ENV_VAR}=pytorch to "
                "silence this, or see `python -m mrdetr.ops info`.",
                RuntimeWarning,
                stacklevel=3,
            )
        return "pytorch"
    if device_type != backend:
        raise ValueError(
            f"backend={backend!r} needs inputs on a {backend} device, got inputs on {device_type}"
        )
    ok, reason = _build.load(backend)
    if not ok:
        raise RuntimeError(
            f"mrdetr: the {backend} ms_deform_attn kernel is not available: {reason}"
        )
    return backend
