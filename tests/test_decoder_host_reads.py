"""MultiRouteDecoder reads the level shapes from the device at most once per call (none when
given ``spatial_shapes_list``), forward and backward, whatever the number of layers; the outputs
are those of the tensor-only path of the op."""

import pytest
import torch
from test_decoder import SHAPES, box_heads, decode, make_decoder, make_inputs

from mrdetr.profiling import OpCounter


def _decoder(backend):
    dec = make_decoder()
    for layer in dec.layers:
        layer.cross_attn.backend = backend
    return dec


def _step(dec, heads, inputs, **kwargs):
    out = decode(dec, *inputs, box_heads=heads, **kwargs)
    (out.hidden_states.sum() + out.boxes.sum()).backward()
    return out


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
@pytest.mark.parametrize("given, reads", [(False, 1), (True, 0)])
def test_one_read_per_call_or_none_with_host_shapes(backend, given, reads):
    dec, heads = _decoder(backend), box_heads()
    kwargs = {"spatial_shapes_list": [tuple(hw) for hw in SHAPES.tolist()]} if given else {}
    inputs = make_inputs()
    _step(dec, heads, inputs, **kwargs)  # builds the kernel outside the count
    with OpCounter() as count:
        out = _step(dec, heads, inputs, **kwargs)
    assert count.host_reads == reads, dict(count.read_ops)
    # the layers called the op with host shapes: same result as each op reading the tensors
    want = _decoder(backend)
    query, pos, boxes, value, ratios = make_inputs()
    for layer in want.layers:
        layer.cross_attn.forward = _tensor_only(layer.cross_attn)
    expected = decode(want, query, pos, boxes, value, ratios, box_heads=box_heads())
    torch.testing.assert_close(out.hidden_states, expected.hidden_states, rtol=1e-5, atol=1e-6)


def _tensor_only(module):
    forward = type(module).forward

    def call(*args, spatial_shapes_list=None, **kwargs):
        return forward(module, *args, **kwargs)

    return call
