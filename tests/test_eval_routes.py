"""Evaluating auxiliary routes: set_eval_routes on the decoder and the layer."""

import copy

import pytest
import torch
from test_decoder import box_heads, decode, make_decoder, make_inputs

from mrdetr import routes


@pytest.mark.parametrize("names", [["aux_ffn"], ["aux_instruct"], ["aux_ffn", "aux_instruct"]])
def test_eval_routes_equal_training_outputs(names):
    dec, heads = make_decoder(), box_heads()
    inputs = make_inputs()
    train = decode(dec.train(), *inputs, box_heads=heads)  # dropout 0: train == eval maths
    dec.eval().set_eval_routes(names)
    n = 1 + max(["primary", "aux_ffn", "aux_instruct"].index(x) for x in names)
    assert dec.eval_route_names == ("primary", "aux_ffn", "aux_instruct")[:n]
    with torch.inference_mode():
        ev = decode(dec, *inputs, box_heads=heads)
    assert ev.hidden_states.shape[1] == n
    torch.testing.assert_close(ev.hidden_states, train.hidden_states[:, :n])
    torch.testing.assert_close(ev.reference_points, train.reference_points[:, :n])
    # the training forward is unaffected by the switch
    again = decode(dec.train(), *inputs, box_heads=heads)
    assert again.hidden_states.shape[1] == 3
    # () restores the default: primary only
    ev1 = decode(dec.eval().set_eval_routes(), *inputs, box_heads=heads)
    assert ev1.hidden_states.shape[1] == 1 and dec.eval_route_names == ("primary",)


def test_eval_routes_survive_deepcopy_and_are_cleared_by_strip():
    dec = make_decoder().set_eval_routes(["aux_ffn"])
    assert copy.deepcopy(dec).eval_route_names == ("primary", "aux_ffn")
    dec.strip_auxiliary()
    assert dec.eval_route_names == ("primary",)
    inputs = make_inputs()
    assert decode(dec.eval(), *inputs).hidden_states.shape[1] == 1


def test_bad_names():
    dec = make_decoder()
    with pytest.raises(ValueError, match="auxiliary routes"):
        dec.set_eval_routes(["primary"])
    with pytest.raises(ValueError, match="auxiliary routes"):
        dec.set_eval_routes("nope")
    layer = make_decoder(rs=routes.baseline()).layers[0]
    with pytest.raises(ValueError, match="auxiliary routes"):
        layer.set_eval_routes(["aux_ffn"])
