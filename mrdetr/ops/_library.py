"""Python-side registrations for the compiled op: fake (meta) kernels and autograd.

The schema lives in C++ (``csrc/ms_deform_attn/ms_deform_attn.cpp``); once that library is
loaded, :func:`register` teaches ``torch.compile`` the output shapes and autograd the backward op.
"""

from __future__ import annotations

import torch

_registered = False


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    b, _, h, d = value.shape
    return value.new_empty((b, sampling_locations.shape[1], h * d))


def _backward_fake(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    return (
        torch.empty_like(value),
        torch.empty_like(sampling_locations),
        torch.empty_like(attention_weights),
    )


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    grad_value, grad_loc, grad_attn = torch.ops.mrdetr.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_loc, grad_attn


def register() -> None:
    """Register fake kernels and autograd for ``mrdetr::ms_deform_attn_{forward,backward}``."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("mrdetr::ms_deform_attn_forward")(_forward_fake)
    torch.library.register_fake("mrdetr::ms_deform_attn_backward")(_backward_fake)
    torch.library.register_autograd(
        "mrdetr::ms_deform_attn_forward", _backward, setup_context=_setup_context
    )
    _registered = True
