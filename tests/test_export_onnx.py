"""ONNX export: ms_deform_attn lowered to GridSample, checked with onnxruntime against PyTorch.

Every model is exported at one batch / query count / image size and run at others, so the
dynamic axes are really exercised; the level shapes are graph inputs read at run time.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.export import Dim

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from _export import (  # noqa: E402
    DecoderWithHeads,
    decoder_inputs,
    level_inputs,
    run_onnxruntime,
    stripped_decoder,
)

from mrdetr import MultiScaleDeformableAttention  # noqa: E402
from mrdetr.export import export_onnx  # noqa: E402
from mrdetr.ops import ms_deform_attn  # noqa: E402

FP32 = dict(rtol=1e-4, atol=1e-5)


class Op(nn.Module):
    """The bare op as a module, so the test controls every sampling location."""

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, weights)


def op_inputs(batch, queries, levels, heads=2, dim=3, points=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes, starts = level_inputs(levels)
    value = torch.randn(batch, int(shapes.prod(1).sum()), heads, dim, generator=g)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, generator=g) * 1.6 - 0.3
    attn = torch.rand(batch, queries, heads, len(levels), points, generator=g)
    return value, shapes, starts, loc, attn


def oracle(value, spatial_shapes, level_start_index, loc, attn):
    """The documented semantics, point by point in float64: bilinear, zero padding,
    align_corners=False, NaN locations give NaN, other locations outside sample zeros."""
    value, loc, attn = value.double(), loc.double(), attn.double()
    b_, _, h_, d_ = value.shape
    q_, l_, p_ = loc.shape[1], loc.shape[3], loc.shape[4]
    out = torch.zeros(b_, q_, h_, d_, dtype=torch.float64)
    for b in range(b_):
        for q in range(q_):
            for h in range(h_):
                for lvl in range(l_):
                    hh, ww = spatial_shapes[lvl].tolist()
                    start = int(level_start_index[lvl])
                    for p in range(p_):
                        fx, fy = loc[b, q, h, lvl, p].tolist()
                        a = float(attn[b, q, h, lvl, p])
                        if math.isnan(fx) or math.isnan(fy):
                            out[b, q, h] += math.nan
                            continue
                        x, y = fx * ww - 0.5, fy * hh - 0.5
                        if not (-1 < x < ww and -1 < y < hh):
                            continue
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < hh and 0 <= xx < ww:
                                cw = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                out[b, q, h] += a * cw * value[b, start + yy * ww + xx, h]
    return out.reshape(b_, q_, h_ * d_)


def export_op(args):
    dims = {0: Dim("batch"), 1: Dim("positions")}
    locs = {0: dims[0], 1: Dim("queries")}
    dyn = (dims, None, None, locs, {0: dims[0], 1: locs[1]})
    return export_onnx(Op().eval(), args, dynamic_shapes=dyn)


@pytest.fixture(scope="module")
def op_program():
    return export_op(op_inputs(2, 4, ((6, 9), (3, 5))))


def test_lowering_matches_the_documented_semantics_at_other_shapes(op_program):
    nodes = {n.op_type for n in op_program.model_proto.graph.node}
    assert "GridSample" in nodes and not any(
        n.domain == "mrdetr" for n in op_program.model_proto.graph.node
    )
    value, shapes, starts, loc, attn = op_inputs(3, 5, ((7, 4), (2, 11)), seed=1)
    # edge cases: exact borders, just outside, far outside, +-inf, NaN (one coordinate)
    specials = [(0.0, 0.0), (1.0, 1.0), (-0.05, 0.5), (1.04, 0.2), (3e38, 0.5), (-3e38, 0.1),
                (math.inf, 0.5), (0.5, -math.inf), (math.nan, 0.5), (0.3, math.nan)]  # fmt: skip
    for i, xy in enumerate(specials):
        loc[i % 3, i % 5, i % 2, i % 2, i % 3] = torch.tensor(xy)
    (got,) = run_onnxruntime(op_program.model_proto, (value, shapes, starts, loc, attn))
    expected = oracle(value, shapes, starts, loc, attn).float()
    assert got.isnan().any() and not expected.isinf().any()
    torch.testing.assert_close(got, expected, equal_nan=True, **FP32)


def test_lowering_matches_the_op_on_finite_inputs(op_program):
    for batch, queries, levels in ((1, 9, ((5, 5), (1, 3))), (4, 2, ((10, 3), (6, 6)))):
        args = op_inputs(batch, queries, levels, seed=batch)
        (got,) = run_onnxruntime(op_program.model_proto, args)
        torch.testing.assert_close(got, ms_deform_attn(*args), **FP32)


def test_attention_module_dynamic_batch_queries_and_image_size():
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(32, 4, 2, 2).eval()

    def inputs(b, q, levels):
        shapes, starts = level_inputs(levels)
        s = int(shapes.prod(1).sum())
        return torch.randn(b, q, 32), torch.rand(b, q, 2, 2), torch.randn(b, s, 32), shapes, starts

    batch, queries = Dim("batch"), Dim("queries")
    dyn = ({0: batch, 1: queries}, {0: batch, 1: queries}, {0: batch, 1: Dim("s")}, None, None)
    program = export_onnx(m, inputs(2, 7, ((8, 10), (4, 5))), dynamic_shapes=dyn)
    other = inputs(3, 5, ((6, 13), (3, 7)))
    with torch.inference_mode():
        (got,) = run_onnxruntime(program.model_proto, other)
        expected = m(*other)
    assert got.shape == (3, 5, 32)
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.slow
def test_stripped_decoder_with_refinement_dynamic_shapes(tmp_path):
    model, dyn = stripped_decoder()
    path = tmp_path / "decoder.onnx"
    export_onnx(model, decoder_inputs(2, 6, ((8, 8), (4, 4))), path, dynamic_shapes=dyn)
    import onnx

    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    other = decoder_inputs(3, 9, ((10, 6), (5, 3)), seed=1)
    with torch.inference_mode():
        logits, boxes = run_onnxruntime(proto, other)
        expected = model(*other)
    torch.testing.assert_close(logits, expected[0], **FP32)
    torch.testing.assert_close(boxes, expected[1], **FP32)


def test_bad_arguments_raise_clear_errors():
    model = DecoderWithHeads()
    args = decoder_inputs(1, 2, ((2, 2), (1, 1)))
    with pytest.raises(ValueError, match="training mode"):
        export_onnx(model.train(), args)
    with pytest.raises(ValueError, match="opset_version must be an int >= 18"):
        export_onnx(model.eval(), args, opset_version=16)
