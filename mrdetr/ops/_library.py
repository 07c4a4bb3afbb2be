"""The ``mrdetr::ms_deform_attn_{forward,backward}`` ops: schema, fake kernels and autograd.

All three are registered here, in Python, when ``mrdetr.ops`` is imported (the way
pytorch/extension-cpp does it), before any compiled library exists. Each compiled library
(``csrc/ms_deform_attn/cpu``, ``.../cuda``) then only adds its device's kernels with
``TORCH_LIBRARY_IMPL``, so the CUDA library needs nothing from the CPU one and loading either
needs no callback.
"""

from __future__ import annotations

import torch

from . import _autocast

FORWARD = "mrdetr::ms_deform_attn_forward"
BACKWARD = "mrdetr::ms_deform_attn_backward"

torch.library.define(
    FORWARD,
    "(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
)
torch.library.define(
    BACKWARD,
    "(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)",
)


@torch.library.register_fake(FORWARD)
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    b, _, h, d = value.shape
    return value.new_empty((b, sampling_locations.shape[1], h * d))


@torch.library.register_fake(BACKWARD)
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


def _double_backward(ctx, grad_value, grad_loc, grad_attn):
    raise RuntimeError(
        "mrdetr: double backward (create_graph=True, then differentiating the gradients) "
        "through the compiled ms_deform_attn kernels is not implemented; use "
        "backend='pytorch' (the reference differentiates to any order)"
    )


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)
# The backward op's outputs are differentiable in form only: without this, a second derivative
# through the kernels would silently be zero.
torch.library.register_autograd(BACKWARD, _double_backward, setup_context=_no_context)
_autocast.register(FORWARD)
