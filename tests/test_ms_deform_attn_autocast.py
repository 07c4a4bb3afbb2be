"""``torch.autocast``: the op's autocast rule; the module and ``MultiRouteDecoder`` in CPU bf16."""

from __future__ import annotations

import pytest
import torch
from _msda import make_inputs

from mrdetr import routes
from mrdetr.layers import MultiRouteDecoder, MultiScaleDeformableAttention
from mrdetr.ops import ms_deform_attn, ms_deform_attn_reference

ALL = ["pytorch", "cpu"]
LEVELS = ((6, 8), (3, 4))
SHAPES = torch.tensor(LEVELS)
STARTS = torch.tensor([0, 48])


def _mixed():
    """Inputs as a decoder makes them under autocast: bf16 value, fp32 locations and weights."""
    value, ss, lsi, loc, attn = make_inputs(levels=LEVELS, dtype=torch.float32)
    return value.bfloat16(), ss, lsi, loc, attn


@pytest.mark.parametrize("backend", ALL)
def test_mixed_dtypes_run_in_the_widest_dtype(backend):
    value, ss, lsi, loc, attn = _mixed()
    with torch.autocast("cpu", torch.bfloat16):
        out = ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
    assert out.dtype == torch.float32  # the widest of bf16 / fp32 / fp32
    expected = ms_deform_attn_reference(value.float(), ss, lsi, loc, attn)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_registered_rule_casts_direct_op_calls():
    value, ss, lsi, loc, attn = _mixed()
    ms_deform_attn(*make_inputs(), backend="cpu")  # build/load the kernel
    with torch.autocast("cpu", torch.bfloat16):
        out = torch.ops.mrdetr.ms_deform_attn_forward(value, ss, lsi, loc, attn)
    expected = ms_deform_attn_reference(value.float(), ss, lsi, loc, attn)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="share one dtype"):  # outside autocast: no casting
        torch.ops.mrdetr.ms_deform_attn_forward(value, ss, lsi, loc, attn)


def test_same_dtype_inputs_are_left_alone():
    value, ss, lsi, loc, attn = make_inputs(levels=LEVELS, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        out = ms_deform_attn(value, ss, lsi, loc, attn, backend="cpu")
    assert out.dtype == torch.bfloat16


def test_mixed_dtypes_outside_autocast_still_raise():
    value, ss, lsi, loc, attn = _mixed()
    with pytest.raises(TypeError, match="sampling_locations must have value's dtype"):
        ms_deform_attn(value, ss, lsi, loc, attn)


@pytest.mark.parametrize("backend", ALL)
def test_module_under_cpu_bf16_autocast_is_close_to_fp32(backend):
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(32, num_heads=4, num_levels=2, num_points=2)
    module.backend = backend
    query, memory = torch.randn(2, 7, 32), torch.randn(2, 60, 32)
    ref = torch.rand(2, 7, 2, 2)
    expected = module(query, ref, memory, SHAPES, STARTS)
    expected.square().mean().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        out = module(query, ref, memory, SHAPES, STARTS)
    assert out.dtype == torch.bfloat16  # output_proj is a bf16 matmul
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    for p, g in zip(module.parameters(), grads, strict=True):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, g, rtol=0.1, atol=0.02 * g.abs().max().item())


@pytest.mark.parametrize("backend", ALL)
def test_multi_route_decoder_under_cpu_bf16_autocast_is_close_to_fp32(backend):
    torch.manual_seed(0)
    dec = MultiRouteDecoder(
        2, embed_dim=32, num_heads=4, ffn_dim=48, num_levels=2, num_points=2, dropout=0.0,
        routes=routes.mr_detr(), backend=backend,
    )  # fmt: skip
    heads = torch.nn.ModuleList(torch.nn.Linear(32, 4) for _ in range(2))
    g = torch.Generator().manual_seed(1)
    r, b, q = 3, 2, 6
    query, pos = torch.randn(r, b, q, 32, generator=g), torch.randn(r, b, q, 32, generator=g)
    centres = 0.2 + 0.6 * torch.rand(r, b, q, 2, generator=g)
    boxes = torch.cat([centres, 0.1 + 0.2 * torch.rand(r, b, q, 2, generator=g)], -1)
    memory = torch.randn(b, 60, 32, generator=g)
    target = torch.rand(2, r, b, q, 4, generator=g)

    def loss():
        out = dec(
            query, reference_points=boxes, value=memory, spatial_shapes=SHAPES,
            level_start_index=STARTS, query_pos=pos, box_heads=heads,
        )  # fmt: skip
        return (out.boxes.float() - target).abs().mean() + out.hidden_states.float().pow(2).mean()

    expected = loss()
    with torch.autocast("cpu", torch.bfloat16):
        got = loss()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.0)
    got.backward()
    assert all(torch.isfinite(p.grad).all() for p in dec.parameters() if p.grad is not None)
