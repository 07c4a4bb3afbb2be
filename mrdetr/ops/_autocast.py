"""The autocast rule of ``mrdetr::ms_deform_attn_forward`` (CPU and CUDA), registered once.

Under ``torch.autocast`` the op's three floating inputs arrive in different dtypes (the value
projection gives bf16/fp16, the softmaxed weights and the reference-point sums fp32). Like
torchvision's ops, the rule casts them to one dtype and runs the op with autocast excluded: the
widest of the three (bf16 < fp16 < fp32 < fp64 in this order), so sampling locations keep fp32
precision when they have it (bf16 holds 8 bits: a location on a 150-pixel map would be off by up
to half a pixel). Inputs that already share a dtype are left alone, so half-precision inputs run
the half kernels. The output has that dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["autocast_inputs", "register"]

# widest last; fp16 after bf16: fp16 has the finer mantissa, which is what locations need
_ORDER = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def widest_dtype(*tensors: Tensor) -> torch.dtype:
    """The widest floating dtype of ``tensors`` in the order bf16 < fp16 < fp32 < fp64."""
    return max((t.dtype for t in tensors), key=_ORDER.index)


def _cast(value: Tensor, loc: Tensor, attn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if value.dtype == loc.dtype == attn.dtype or not all(
        t.dtype in _ORDER for t in (value, loc, attn)
    ):
        return value, loc, attn  # nothing to cast, or the op's own check names the bad dtype
    dtype = widest_dtype(value, loc, attn)
    return value.to(dtype), loc.to(dtype), attn.to(dtype)


def autocast_inputs(value: Tensor, loc: Tensor, attn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(value, sampling_locations, attention_weights)`` as the autocast rule casts them when
    autocast is on for their device; unchanged otherwise (for the PyTorch reference path)."""
    device = value.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return value, loc, attn
    return _cast(value, loc, attn)


def _rule(device_type: str):
    key = getattr(torch._C.DispatchKey, "Autocast" + device_type.upper())

    def run(value, spatial_shapes, level_start_index, loc, attn):
        value, loc, attn = _cast(value, loc, attn)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return torch.ops.mrdetr.ms_deform_attn_forward.default(
                value, spatial_shapes, level_start_index, loc, attn
            )

    def kernel(_keyset, *args):
        return run(*args)

    return key, run, kernel


_libraries: list[torch.library.Library] = []


def register(qualname: str) -> None:
    """Register the rule for ``qualname`` (the forward op) under AutocastCPU and AutocastCUDA.

    Done the way ``torch.library.register_autocast`` does it for a fixed dtype: a kernel for
    eager dispatch and a Python kernel for tracing (``make_fx``, ``torch.export``).
    """
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    lib = torch.library.Library(namespace, "IMPL")
    for device_type in ("cpu", "cuda"):
        key, run, kernel = _rule(device_type)
        op.py_impl(key)(run)
        lib.impl(name, kernel, "Autocast" + device_type.upper(), with_keyset=True)
    _libraries.append(lib)  # a Library's registrations last as long as the object
