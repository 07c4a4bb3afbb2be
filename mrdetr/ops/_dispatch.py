"""Public ``ms_deform_attn`` op: validation, then dispatch to a compiled kernel or the reference."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _build
from ._autocast import autocast_inputs
from ._checks import check_inputs, host_shapes
from ._reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "BACKENDS"]

BACKENDS = ("auto", "pytorch", "cpu", "cuda")
ENV_VAR = "MRDETR_BACKEND"
_warned: set[str] = set()


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | None,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str = "auto",
    spatial_shapes_list: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Multi-scale deformable attention (Deformable-DETR's op, without ``im2col_step``).

    For every batch ``b``, query ``q`` and head ``h``::

        out[b, q, h*D:(h+1)*D] = sum_{l, p} attention_weights[b, q, h, l, p]
                                 * bilinear(value[b, level l, h], sampling_locations[b, q, h, l, p])

    with zero padding outside the map and ``align_corners=False`` pixel centres.
    :func:`ms_deform_attn_reference` is the equivalent PyTorch code.

    Args:
        value (Tensor[B, S, H, D]): flattened multi-level value maps, ``S = sum(h * w)``.
        spatial_shapes (Tensor[L, 2], int64, or None): ``(h, w)`` of every level. None only
            with ``spatial_shapes_list``.
        level_start_index (Tensor[L], int64, or None): offset of every level in ``S``. None only
            with ``spatial_shapes_list``.
        sampling_locations (Tensor[B, Q, H, L, P, 2]): normalised ``(x, y)``; ``[0, 1]`` spans
            the map, points outside (``+-inf`` included) sample zeros, a NaN point makes its
            output row NaN (see docs/ops.md, "Non-finite input").
        attention_weights (Tensor[B, Q, H, L, P]): weight of every sample.
        backend: ``"auto"`` (compiled kernel for the inputs' device, building it on first use,
            else the reference with one warning saying why), ``"pytorch"`` (the reference),
            ``"cpu"`` or ``"cuda"`` (that kernel or a ``RuntimeError`` saying why not). With
            ``"auto"``, the environment variable ``MRDETR_BACKEND`` picks instead when set.
        spatial_shapes_list: the levels' ``(h, w)`` as host integers (HF transformers'
            ``spatial_shapes_list``). With it the call reads nothing from the device: the checks
            use these integers and missing level tensors are built from them (a host-to-device
            copy). Without it, the level tensors are read once per call (one device-to-host
            copy, a synchronisation on CUDA). Given with the tensors, it must describe the same
            levels; that is not checked (it would need the read), but whatever the tensors hold,
            no kernel reads outside ``value`` (docs/ops.md, "Bounds safety").

    Returns:
        Tensor[B, Q, H * D] in value's dtype (fp16/bf16 accumulate in fp32 in the kernels). Under
        ``torch.autocast`` the three floating inputs are first cast to the widest of their
        dtypes, which is then the output's dtype (docs/ops.md, "Autocast").

    Raises:
        TypeError / ValueError: inconsistent inputs, naming the argument (before any kernel).
    """
    if spatial_shapes is None or level_start_index is None:
        spatial_shapes, level_start_index = _level_tensors(
            spatial_shapes, level_start_index, spatial_shapes_list, value
        )
    shapes = check_inputs(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        spatial_shapes_list,
    )
    chosen = _resolve_backend(backend, value.device.type)
    if chosen == "pytorch":
        value, sampling_locations, attention_weights = autocast_inputs(
            value, sampling_locations, attention_weights
        )
        return ms_deform_attn_reference(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            spatial_shapes_list=shapes,
        )
    return torch.ops.mrdetr.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _level_tensors(
    spatial_shapes: Tensor | None,
    level_start_index: Tensor | None,
    spatial_shapes_list: Sequence[tuple[int, int]] | None,
    value: Tensor,
) -> tuple[Tensor, Tensor]:
    """The missing level tensor(s), from ``spatial_shapes_list``: one host-to-device copy."""
    if spatial_shapes_list is None:
        missing = "spatial_shapes" if spatial_shapes is None else "level_start_index"
        raise TypeError(
            f"ms_deform_attn: {missing} must be a Tensor unless spatial_shapes_list gives the "
            "levels as host (h, w) integers, got None"
        )
    shapes = host_shapes(spatial_shapes_list, len(spatial_shapes_list))
    starts = [0]
    for hh, ww in shapes[:-1]:
        starts.append(starts[-1] + hh * ww)
    flat = torch.tensor([x for hw in shapes for x in hw] + starts, dtype=torch.int64)
    flat = flat.to(value.device, non_blocking=True)
    n = 2 * len(shapes)
    if spatial_shapes is None:
        spatial_shapes = flat[:n].view(len(shapes), 2)
    if level_start_index is None:
        level_start_index = flat[n:]
    return spatial_shapes, level_start_index


def _assume_constant_result(fn):
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does, without importing it.

    ``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` (about 1 s) to set this
    one attribute; ``import mrdetr`` must not pay that. tests/test_import_time.py checks that
    torch's decorator still sets exactly this marker.
    """
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
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
