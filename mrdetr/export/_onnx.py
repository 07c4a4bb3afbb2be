"""ONNX export: ``mrdetr``'s deformable-attention op lowered to standard ONNX ops (GridSample).

``torch.onnx.export`` (the ``torch.export``-based exporter) translates every ATen op with
onnxscript's library; our custom op ``mrdetr::ms_deform_attn*`` needs a translation of its own.
:func:`ms_deform_attn_onnx` is that translation, written with opset-18 ops only, and
:func:`export_onnx` passes it through ``custom_translation_table``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["MIN_OPSET", "export_onnx", "ms_deform_attn_onnx", "onnx_translation_table"]

# GridSample needs opset 16; torch.onnx translates ATen ops at opset 18 and does not convert a
# model down (it keeps 18 with a warning), so 18 is the real floor.
MIN_OPSET = 18
_OP_NAMES = ("ms_deform_attn", "ms_deform_attn_forward")  # forward op names, newest first
# Grid coordinates are clipped to [-_FAR, _FAR]: any |g| >= 2 is already a whole pixel outside
# every map (g = -1 - 1/w is the last coordinate that touches pixel 0), so clipping changes no
# sample, and +-inf or 3e38 never reach GridSample's float -> int conversion.
_FAR = 3.0
_BOOL, _FLOAT = 9, 1  # onnx.TensorProto.BOOL / FLOAT


def _static_dim(value: Any, axis: int, what: str) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise ValueError(
            f"ms_deform_attn ONNX lowering: {what} (axis {axis}) must be static, got {dim!r}"
        )
    return dim


def ms_deform_attn_onnx(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Lower ``mrdetr::ms_deform_attn`` to ONNX ops (opset 18: GridSample, Gather, Slice, ...).

    Called by the exporter with onnxscript values, traced once per op call in the graph. Batch
    ``B``, queries ``Q`` and ``S`` may be dynamic; the level shapes are *read at run time* from
    ``spatial_shapes`` and ``level_start_index``, so one exported model serves any image size.
    Heads ``H``, channels ``D``, levels ``L`` and points ``P`` are static.

    Semantics are the op's: bilinear, zero padding, ``align_corners=False``; a NaN location
    makes its sample NaN (it propagates to the output), every other location outside the map
    (including +-inf) samples zeros.

    Args:
        value (Tensor[B, S, H, D]), spatial_shapes (Tensor[L, 2], int64),
        level_start_index (Tensor[L], int64), sampling_locations (Tensor[B, Q, H, L, P, 2]),
        attention_weights (Tensor[B, Q, H, L, P]): the op's inputs.

    Returns:
        Tensor[B, Q, H * D]
    """
    from onnxscript import opset18 as op

    def ints(*xs: int):
        return op.Constant(value_ints=list(xs))

    def scalar(x: float, like):
        return op.CastLike(op.Constant(value_float=x), like)

    h, d = _static_dim(value, 2, "heads"), _static_dim(value, 3, "channels per head")
    levels = _static_dim(sampling_locations, 3, "levels")
    points = _static_dim(sampling_locations, 4, "points")
    b = op.Shape(value, start=0, end=1)
    s = op.Shape(value, start=1, end=2)
    q = op.Shape(sampling_locations, start=1, end=2)
    v = op.Transpose(value, perm=[0, 2, 3, 1])
    v = op.Reshape(v, op.Concat(ints(-1, d), s, axis=0))  # [B*H, D, S]
    loc = op.Transpose(sampling_locations, perm=[0, 2, 3, 1, 4, 5])
    loc = op.Reshape(
        loc, op.Concat(ints(-1, levels), q, ints(points, 2), axis=0)
    )  # [B*H, L, Q, P, 2]
    w = op.Transpose(attention_weights, perm=[0, 2, 3, 1, 4])
    w = op.Reshape(w, op.Concat(ints(-1, levels), q, ints(points), axis=0))  # [B*H, L, Q, P]
    # NaN locations: the weight becomes NaN, so the sample (whatever GridSample returns) does too
    nan_loc = op.ReduceMax(op.Cast(op.IsNaN(loc), to=_FLOAT), ints(-1), keepdims=0)
    w = op.Where(op.Cast(nan_loc, to=_BOOL), scalar(math.nan, w), w)
    grid = op.Sub(op.Mul(loc, scalar(2.0, loc)), scalar(1.0, loc))  # GridSample's [-1, 1]
    far = scalar(_FAR, loc)
    grid = op.Where(op.IsNaN(grid), far, op.Clip(grid, op.Neg(far), far))
    out = None
    for lvl in range(levels):
        i = ints(lvl)
        start = op.Gather(level_start_index, i)  # [1]
        hw = op.Gather(spatial_shapes, i)  # [1, 2]
        hh = op.Reshape(op.Slice(hw, ints(0), ints(1), ints(1)), ints(1))
        ww = op.Reshape(op.Slice(hw, ints(1), ints(2), ints(1)), ints(1))
        v_l = op.Slice(v, start, op.Add(start, op.Mul(hh, ww)), ints(2))  # [B*H, D, h*w]
        v_l = op.Reshape(v_l, op.Concat(ints(-1, d), hh, ww, axis=0))  # [B*H, D, h, w]
        g = op.Squeeze(op.Gather(grid, i, axis=1), ints(1))  # [B*H, Q, P, 2]
        sampled = op.GridSample(v_l, g, mode="bilinear", padding_mode="zeros", align_corners=0)
        o = op.ReduceSum(op.Mul(sampled, op.Gather(w, i, axis=1)), ints(3), keepdims=0)
        out = o if out is None else op.Add(out, o)  # [B*H, D, Q]
    out = op.Reshape(out, op.Concat(b, ints(h, d), q, axis=0))  # [B, H, D, Q]
    out = op.Transpose(out, perm=[0, 3, 1, 2])
    return op.Reshape(out, op.Concat(b, q, ints(h * d), axis=0))  # [B, Q, H*D]


def _forward_ops() -> list:
    """The registered overloads of our forward op (its schema name changed once; accept both)."""
    found = []
    for name in _OP_NAMES:
        try:
            found.append(getattr(torch.ops.mrdetr, name).default)
        except (AttributeError, RuntimeError):
            continue
    return found


def onnx_translation_table() -> dict[Callable, Callable]:
    """``{mrdetr forward op: ms_deform_attn_onnx}``, the ``custom_translation_table`` we need.

    Merge it into your own table when you call ``torch.onnx.export`` yourself.

    Raises:
        RuntimeError: the op is not registered in this process (its library could not load).
    """
    ops = _forward_ops()
    if not ops:
        from ..ops import build

        status = build()["cpu"]
        ops = _forward_ops()
        if not ops:
            raise RuntimeError(
                "mrdetr::ms_deform_attn is not registered, so it cannot be exported: "
                f"{status.reason}"
            )
    return {o: ms_deform_attn_onnx for o in ops}


def export_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    args: tuple,
    f: str | os.PathLike | None = None,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    opset_version: int = 18,
    custom_translation_table: dict[Callable, Callable] | None = None,
    **options: Any,
):
    """``torch.onnx.export(..., dynamo=True)`` with ``ms_deform_attn`` lowered to GridSample.

    Args:
        model: an ``nn.Module`` in eval mode (auxiliary routes stripped or not: only the primary
            route runs in eval mode), or a ``torch.export.ExportedProgram``.
        args, kwargs: example inputs, as for ``torch.export.export``.
        f: where to save the ``.onnx`` file (None: only return the program).
        dynamic_shapes: as for ``torch.export.export`` (e.g. ``{"images": {0: Dim("batch")}}``).
        opset_version: target opset, >= 18 (newer ones are converted from 18).
        custom_translation_table: more translations, merged over ours.
        **options: passed on to ``torch.onnx.export`` (``input_names``, ...). ``optimize=True``
            (the default) runs onnxscript's optimizer and keeps its result only when
            ``onnx.checker`` accepts it (see :func:`_optimize_checked`).

    Returns:
        ``torch.onnx.ONNXProgram`` (``.model_proto``, ``.save(path)``, callable with torch tensors).

    Raises:
        ValueError: ``opset_version < 18``, or ``model`` is in training mode.
    """
    if not isinstance(opset_version, int) or opset_version < MIN_OPSET:
        raise ValueError(
            f"opset_version must be an int >= {MIN_OPSET} (torch.onnx does not convert below 18), "
            f"got {opset_version!r}"
        )
    if isinstance(model, nn.Module) and model.training:
        raise ValueError(
            "model is in training mode: call model.eval() before exporting (training mode "
            "would record dropout and every training route)"
        )
    table = onnx_translation_table() | dict(custom_translation_table or {})
    optimize = options.pop("optimize", True)
    program = torch.onnx.export(
        model,
        tuple(args),
        kwargs=kwargs,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        opset_version=opset_version,
        custom_translation_table=table,
        optimize=False,
        **options,
    )
    if optimize:
        _optimize_checked(program)
    if f is not None:
        program.save(os.fspath(f))
    return program


def _optimize_checked(program) -> None:
    """Optimize ``program`` in place, or keep it unoptimized (with a warning) when the result fails
    ``onnx.checker``: onnxscript's optimizer can emit a graph that is not topologically sorted
    (seen on HF DeformableDetr with box refinement), which onnxruntime refuses to load."""
    import onnx
    import onnx_ir

    before = program.model_proto
    program.optimize()
    try:
        onnx.checker.check_model(program.model_proto)
    except onnx.checker.ValidationError as err:
        reason = str(err).strip().splitlines()[0]
        warnings.warn(
            f"mrdetr.export: the ONNX optimizer produced an invalid graph ({reason}); "
            "keeping the unoptimized graph, which computes the same outputs",
            RuntimeWarning,
            stacklevel=3,
        )
        program.model = onnx_ir.from_proto(before)
