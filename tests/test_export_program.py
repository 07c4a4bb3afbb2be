"""torch.export of models using mrdetr's op: exported outputs equal eager at other shapes."""

from __future__ import annotations

import pytest
import torch
from _export import DecoderWithHeads, decoder_inputs, level_inputs, stripped_decoder
from torch.export import Dim

from mrdetr import MultiScaleDeformableAttention


def mrdetr_ops(program):
    return {str(n.target) for n in program.graph.nodes if str(n.target).startswith("mrdetr.")}


def test_attention_module_exports_with_dynamic_batch_queries_and_image_size():
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(32, 4, 2, 2).eval()

    def inputs(b, q, levels):
        shapes, starts = level_inputs(levels)
        s = int(shapes.prod(1).sum())
        return torch.randn(b, q, 32), torch.rand(b, q, 2, 2), torch.randn(b, s, 32), shapes, starts

    batch, queries = Dim("batch"), Dim("queries")
    dyn = ({0: batch, 1: queries}, {0: batch, 1: queries}, {0: batch, 1: Dim("s")}, None, None)
    program = torch.export.export(m, inputs(2, 7, ((8, 10), (4, 5))), dynamic_shapes=dyn)
    assert len(mrdetr_ops(program)) == 1  # one op node, not the reference's per-level graph
    other = inputs(3, 5, ((6, 13), (3, 7)))
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(*other), m(*other))


@pytest.mark.slow
def test_stripped_decoder_exports_saves_and_loads(tmp_path):
    model, dyn = stripped_decoder()
    with torch.inference_mode():
        program = torch.export.export(
            model, decoder_inputs(2, 6, ((8, 8), (4, 4))), dynamic_shapes=dyn
        )
    assert len([n for n in program.graph.nodes if str(n.target).startswith("mrdetr.")]) == 2
    torch.export.save(program, tmp_path / "decoder.pt2")
    loaded = torch.export.load(tmp_path / "decoder.pt2").module()
    other = decoder_inputs(3, 9, ((10, 6), (5, 3)), seed=1)
    with torch.inference_mode():
        expected = model(*other)
        for got in (program.module()(*other), loaded(*other)):
            torch.testing.assert_close(got, expected)


def test_unstripped_decoder_in_eval_exports_the_primary_route_only():
    """eval() alone already runs the primary route: the export equals the stripped model's."""
    torch.manual_seed(0)
    model = DecoderWithHeads().eval()
    args = decoder_inputs(2, 4, ((4, 4), (2, 2)))
    program = torch.export.export(model, args)
    with torch.inference_mode():
        expected = model(*args)
        model.decoder.strip_auxiliary()
        torch.testing.assert_close(model(*args), expected)
        torch.testing.assert_close(program.module()(*args), expected)
