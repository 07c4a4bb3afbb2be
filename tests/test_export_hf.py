"""An unwrapped HF DeformableDetr on mrdetr's op: torch.export and ONNX equal eager.

The deployment path: ``wrap`` (train with the routes), ``unwrap``, then
``use_fast_deformable_attention`` so the sampling runs on ``ms_deform_attn``.

transformers' Deformable-DETR code turns the feature-map sizes into Python ints, so its export
is specialised to the example's image size: the batch is the dynamic axis here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

pytest.importorskip("transformers")

from mrdetr import routes  # noqa: E402
from mrdetr.adapters import unwrap, use_fast_deformable_attention, wrap  # noqa: E402
from mrdetr.testing.hf_models import hf_deformable_detr  # noqa: E402

pytestmark = pytest.mark.slow


class Detections(nn.Module):
    """pixel_values [B, 3, H, W] -> (logits [B, Q, K], pred_boxes [B, Q, 4])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return out.logits, out.pred_boxes


def deployed(**kwargs):
    model = hf_deformable_detr(decoder_layers=2, **kwargs)
    wrap(model, routes.mr_detr(num_instruction_tokens=4))
    unwrap(model.eval())
    use_fast_deformable_attention(model)
    return Detections(model).eval()


def images(batch, seed):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


DYN = ({0: Dim("batch")},)


def test_torch_export_of_hf_deformable_detr_on_the_op():
    model = deployed(with_box_refine=True, two_stage=True)
    program = torch.export.export(model, (images(2, 0),), dynamic_shapes=DYN)
    assert any(str(n.target).startswith("mrdetr.") for n in program.graph.nodes)
    x = images(3, 1)
    with torch.inference_mode():
        expected = model(x)
        got = program.module()(x)
    torch.testing.assert_close(got, expected)


def test_onnx_of_hf_deformable_detr_on_the_op():
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from _export import run_onnxruntime

    from mrdetr.export import export_onnx

    model = deployed(with_box_refine=True)
    program = export_onnx(model, (images(2, 0),), dynamic_shapes=DYN)
    assert "GridSample" in {n.op_type for n in program.model_proto.graph.node}
    x = images(3, 1)
    with torch.inference_mode():
        expected = model(x)
    got = run_onnxruntime(program.model_proto, (x,))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
