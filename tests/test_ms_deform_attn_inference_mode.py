"""torch.inference_mode(): the op, the attention module and the decoder run under it.

Inference tensors have no version counter, so nothing on the op's path may read ``_version``.
Every case builds all its inputs (spatial_shapes included) inside inference mode, as a deployed
model does, and compares with the same call under ``torch.no_grad()``.
"""

from __future__ import annotations

import pytest
import torch
from _msda import BACKENDS, make_inputs
from test_decoder import make_decoder
from test_decoder import make_inputs as decoder_inputs
from test_multi_route_oracle import SHAPES, STARTS, make_layer
from test_multi_route_oracle import make_inputs as layer_inputs

from mrdetr import MultiScaleDeformableAttention, routes
from mrdetr.ops import ms_deform_attn


@pytest.mark.parametrize("backend", ["pytorch", "auto", *BACKENDS])
def test_op_under_inference_mode(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    with torch.no_grad():
        expected = ms_deform_attn(*make_inputs(device=device), backend=backend)
    with torch.inference_mode():
        args = make_inputs(device=device)
        assert all(t.is_inference() for t in args)
        out = ms_deform_attn(*args, backend=backend)
        again = ms_deform_attn(*args, backend=backend)  # a second call with the same tensors
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_module_under_inference_mode(backend):
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(16, 2, 2, 3, backend=backend)
    shapes = [[6, 8], [3, 4]]

    def call():
        ss = torch.tensor(shapes)
        lsi = torch.tensor([0, 48])
        g = torch.Generator().manual_seed(1)
        query = torch.randn(2, 5, 16, generator=g)
        value = torch.randn(2, 60, 16, generator=g)
        ref = torch.rand(2, 5, 2, 2, generator=g)
        return m(query, reference_points=ref, value=value, spatial_shapes=ss, level_start_index=lsi)

    with torch.no_grad():
        expected = call()
    with torch.inference_mode():
        out = call()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_decoder_layer_under_inference_mode(backend):
    rs = routes.mr_detr(3)
    layer = make_layer(rs).eval()
    for module in layer.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            module.backend = backend

    def call():
        query, pos, ref, value = layer_inputs(len(rs))
        return layer(
            query, query_pos=pos, reference_points=ref, value=value,
            spatial_shapes=SHAPES.clone(), level_start_index=STARTS.clone(),
        )  # fmt: skip

    with torch.no_grad():
        expected = call()
    with torch.inference_mode():
        out = call()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_decoder_under_inference_mode():
    dec = make_decoder().eval()

    def call():
        query, pos, boxes, value, ratios = decoder_inputs()
        return dec(
            query, reference_points=boxes, value=value, spatial_shapes=SHAPES.clone(),
            level_start_index=STARTS.clone(), valid_ratios=ratios, query_pos=pos,
        )  # fmt: skip

    with torch.no_grad():
        expected = call()
    with torch.inference_mode():
        out = call()
    for a, e in zip(out, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
