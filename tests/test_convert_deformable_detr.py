"""Original Deformable-DETR decoder <-> MultiRouteDecoderLayer conversion, on trained LayerNorms.

Oracle: the original layer/decoder's own forward (tests/_deformable_detr_fixture.py) with
random non-identity LayerNorms, so that swapping ``norm1``/``norm2`` changes the outputs.
"""

from __future__ import annotations

import pytest
import torch
from _deformable_detr_fixture import make_decoder, make_inputs

from mrdetr import MultiRouteDecoder, MultiRouteDecoderLayer, routes
from mrdetr.convert import (
    DEFORMABLE_DETR_LAYER_KEYS,
    convert_deformable_detr_decoder,
    convert_deformable_detr_layer,
    to_deformable_detr_decoder,
    to_deformable_detr_layer,
)

DIM, HEADS, LEVELS, POINTS, FFN = 32, 4, 2, 2, 64
SIZES = dict(embed_dim=DIM, num_heads=HEADS, ffn_dim=FFN, num_levels=LEVELS, num_points=POINTS)


def ours(route_set=None, **kw) -> MultiRouteDecoderLayer:
    route_set = route_set or routes.baseline()
    return MultiRouteDecoderLayer(**SIZES, dropout=0.0, routes=route_set, backend="pytorch", **kw)


def layer_io(original, inputs):
    """The original layer's output and the same call's arguments for MultiRouteDecoderLayer."""
    tgt, ref, src, shapes, starts, ratios, pos = inputs
    per_level = ref[:, :, None] * ratios[:, None]  # [B, Q, L, 2]
    expected = original(tgt, pos, per_level, src, shapes, starts)
    kwargs = dict(
        query_pos=pos[None],
        reference_points=per_level[None],
        value=src,
        spatial_shapes=shapes,
        level_start_index=starts,
    )
    return expected, tgt[None], kwargs


def test_keys_are_the_original_layers():
    assert set(DEFORMABLE_DETR_LAYER_KEYS) == set(make_decoder().layers[0].state_dict())


def test_layer_converts_with_norms_by_role_and_a_naive_rename_does_not():
    original = make_decoder().layers[0]
    sd = original.state_dict()
    assert not torch.allclose(sd["norm1.weight"], sd["norm2.weight"])  # trained, distinct norms
    expected, query, kwargs = layer_io(original, make_inputs())
    layer = ours()
    layer.load_state_dict(convert_deformable_detr_layer(sd), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(query, **kwargs)[0], expected, rtol=1e-5, atol=1e-5)
        # the trap: keep the norm names, rename only the FFN; strict=True accepts it ...
        naive = {k.replace("linear", "ffn.linear"): v for k, v in sd.items()}
        layer.load_state_dict(naive, strict=True)
        # ... and the outputs are wrong
        assert not torch.allclose(layer(query, **kwargs)[0], expected, atol=1e-2)


def test_round_trip_gives_back_the_original_keys_and_tensors():
    sd = make_decoder().layers[0].state_dict()
    back = to_deformable_detr_layer(convert_deformable_detr_layer(sd))
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)
    # and ours -> theirs -> ours
    mine = ours().state_dict()
    assert convert_deformable_detr_layer(to_deformable_detr_layer(mine)).keys() == mine.keys()


def test_trained_multi_route_layer_exports_to_the_original_layer():
    """A layer trained with Mr. DETR's routes, stripped, converted to the original keys: the
    original layer gives our primary route's output."""
    torch.manual_seed(3)
    layer = ours(routes.mr_detr(num_instruction_tokens=3))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    original = make_decoder(seed=5).layers[0]
    inputs = make_inputs()
    _, query, kwargs = layer_io(original, inputs)
    layer.eval()
    with torch.no_grad():
        primary = layer(query, **kwargs)[0]
    with pytest.raises(ValueError, match="strip_auxiliary"):
        to_deformable_detr_layer(layer.state_dict())
    original.load_state_dict(to_deformable_detr_layer(layer.strip_auxiliary().state_dict()))
    with torch.no_grad():
        expected, _, _ = layer_io(original, inputs)
    torch.testing.assert_close(expected, primary, rtol=1e-5, atol=1e-5)


def test_loads_into_a_multi_route_layer_missing_only_auxiliary_keys():
    original = make_decoder().layers[0]
    layer = ours(routes.mr_detr(num_instruction_tokens=3))
    result = layer.load_state_dict(
        convert_deformable_detr_layer(original.state_dict()), strict=False
    )
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("aux.") for k in result.missing_keys)
    expected, query, kwargs = layer_io(original, make_inputs())
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(query, **kwargs)[0], expected, rtol=1e-5, atol=1e-5)


def test_decoder_with_box_refinement_converts_both_ways():
    """Whole decoder (3 layers, 4-d boxes, bbox_embed refinement): same hidden states; the
    original returns the boxes each layer produced, MultiRouteDecoder the ones each received."""
    original = make_decoder(num_layers=3, box_refine=True)
    tgt, ref, src, shapes, starts, ratios, pos = make_inputs(boxes=True)
    with torch.no_grad():
        hidden, refs = original(tgt, ref, src, shapes, starts, ratios, pos)
    full = {f"transformer.decoder.{k}": v for k, v in original.state_dict().items()}
    converted = convert_deformable_detr_decoder(full)
    assert all(k.startswith("layers.") for k in converted)  # bbox_embed is the detector's
    decoder = MultiRouteDecoder(
        3, **SIZES, dropout=0.0, routes=routes.baseline(), backend="pytorch"
    )
    decoder.load_state_dict(converted, strict=True)
    with torch.no_grad():
        out = decoder(
            tgt[None], reference_points=ref[None], value=src, spatial_shapes=shapes,
            level_start_index=starts, valid_ratios=ratios, query_pos=pos[None],
            box_heads=original.bbox_embed,
        )  # fmt: skip
    torch.testing.assert_close(out.hidden_states[:, 0], hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reference_points[1:, 0], refs[:-1], rtol=1e-5, atol=1e-5)
    back = to_deformable_detr_decoder(decoder.state_dict())
    assert back.keys() == {k for k in full if ".layers." in k}
    assert all(torch.equal(back[k], full[k]) for k in back)


def test_errors_list_the_keys():
    sd = make_decoder().layers[0].state_dict()
    with pytest.raises(ValueError, match=r"missing: \['norm3.bias'\]"):
        convert_deformable_detr_layer({k: v for k, v in sd.items() if k != "norm3.bias"})
    with pytest.raises(ValueError, match=r"unknown: \['extra'\]"):
        convert_deformable_detr_layer({**sd, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="layer transformer.decoder.layers.0: .*missing"):
        convert_deformable_detr_decoder(
            {"transformer.decoder.layers.0.norm1.weight": sd["norm1.weight"]}
        )
    with pytest.raises(ValueError, match="no key of state_dict starts with prefix"):
        convert_deformable_detr_decoder(sd)
