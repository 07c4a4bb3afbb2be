"""Reference checkpoint conversion against a small reference layer written from the documented
key layout (docs/routes.md)."""

import pytest
import torch
import torch.nn.functional as F
from test_multi_route_oracle import HEADS, LEVELS, POINTS, SHAPES, STARTS, C, make_inputs, run
from torch import nn

from mrdetr import routes
from mrdetr.convert import (
    REFERENCE_LAYER_KEYS,
    convert_reference_decoder,
    convert_reference_layer,
)
from mrdetr.layers.decoder import MultiRouteDecoder
from mrdetr.layers.ms_deform_attn import MultiScaleDeformableAttention
from mrdetr.layers.multi_route import MultiRouteDecoderLayer

FFN_DIM, TOKENS = 48, 10


class SepLinear(nn.Module):
    """``linear`` (shared) and ``linear_sep`` (Route-1), as in the reference FFN."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear, self.linear_sep = nn.Linear(cin, cout), nn.Linear(cin, cout)


class Holder(nn.Module):
    def __init__(self, **mods):
        super().__init__()
        for k, v in mods.items():
            setattr(self, k, v)


class ReferenceLayer(nn.Module):
    """One reference decoder layer: plain call = primary, sep=True Route-1, o2m=True Route-3."""

    def __init__(self):
        super().__init__()
        sa = Holder(
            attn=nn.MultiheadAttention(C, HEADS, batch_first=True),
            instruction_o2m=nn.Embedding(TOKENS, C),
            instruction_o2m_pos=nn.Embedding(TOKENS, C),
            norm_o2o=nn.LayerNorm(C),
            norm_o2m=nn.LayerNorm(C),
        )
        ca = MultiScaleDeformableAttention(C, HEADS, LEVELS, POINTS, backend="pytorch")
        self.attentions = nn.ModuleList([sa, ca])
        layers = nn.ModuleList([Holder(linear=SepLinear(C, FFN_DIM)), SepLinear(FFN_DIM, C)])
        self.ffns = nn.ModuleList([Holder(layers=layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(C), nn.LayerNorm(C)])

    def forward(self, q, pos, ref, value, o2m=False, sep=False):
        sa = self.attentions[0]
        if o2m:
            b = q.shape[0]
            tok = sa.instruction_o2m.weight[None].expand(b, -1, -1)
            tok_pos = sa.instruction_o2m_pos.weight[None].expand(b, -1, -1)
            qk = torch.cat([tok + tok_pos, q + pos], 1)
            out = sa.attn(qk, qk, torch.cat([tok, q], 1))[0][:, TOKENS:]
            q = sa.norm_o2m(q + out)
        else:
            q = sa.norm_o2o(q + sa.attn(q + pos, q + pos, q)[0])
        q = self.norms[0](q + self.attentions[1](q + pos, ref, value, SHAPES, STARTS))
        first, second = self.ffns[0].layers[0].linear, self.ffns[0].layers[1]
        l0, l1 = (first.linear_sep, second.linear_sep) if sep else (first.linear, second.linear)
        return self.norms[1](q + l1(F.relu(l0(q))))


def reference_layer(seed=0):
    torch.manual_seed(seed)
    ref = ReferenceLayer()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def test_reference_layout_is_the_documented_one():
    assert set(reference_layer().state_dict()) == set(REFERENCE_LAYER_KEYS)
    # SA 4 + tokens 2 + two norms 4; deformable 4 linears x 2; FFN 4 linears x 2; norms 4
    assert len(REFERENCE_LAYER_KEYS) == 4 + 2 + 4 + 8 + 8 + 4


def target_layer():
    return MultiRouteDecoderLayer(
        C, HEADS, FFN_DIM, LEVELS, POINTS, 0.0, routes=routes.mr_detr(TOKENS), backend="pytorch"
    )


@pytest.mark.parametrize("same_inputs", [True, False])
def test_converted_layer_reproduces_all_three_reference_routes(same_inputs):
    ref = reference_layer()
    layer = target_layer()
    layer.load_state_dict(convert_reference_layer(ref.state_dict()), strict=True)
    query, pos, boxes, value = make_inputs(3)
    if same_inputs:
        query, pos, boxes = (t[:1].expand(3, *t.shape[1:]) for t in (query, pos, boxes))
    out = run(layer.train(), query, pos, boxes, value)
    calls = [dict(), dict(sep=True), dict(o2m=True)]  # primary, Route-1, Route-3
    for i, kwargs in enumerate(calls):
        expected = ref(query[i], pos[i], boxes[i], value, **kwargs)
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=1e-5)


def test_convert_whole_decoder_checkpoint():
    refs = [reference_layer(seed) for seed in range(2)]
    ckpt = {
        "backbone.conv.weight": torch.zeros(1),
        "transformer.decoder.bbox_embed.0.w": torch.ones(1),
    }
    for i, r in enumerate(refs):
        ckpt.update({f"transformer.decoder.layers.{i}.{k}": v for k, v in r.state_dict().items()})
    dec = MultiRouteDecoder(
        2, embed_dim=C, num_heads=HEADS, ffn_dim=FFN_DIM, num_levels=LEVELS, num_points=POINTS,
        dropout=0.0, routes=routes.mr_detr(TOKENS), backend="pytorch",
    )  # fmt: skip
    dec.load_state_dict(convert_reference_decoder(ckpt), strict=True)
    query, pos, boxes, value = make_inputs(3)
    for i, r in enumerate(refs):
        out = run(dec.layers[i], query, pos, boxes, value)
        torch.testing.assert_close(
            out[2], r(query[2], pos[2], boxes[2], value, o2m=True), atol=2e-5, rtol=1e-5
        )


def test_conversion_errors_name_the_keys():
    sd = reference_layer().state_dict()
    missing = {k: v for k, v in sd.items() if "norm_o2m" not in k}
    with pytest.raises(ValueError, match="norm_o2m"):
        convert_reference_layer(missing)
    with pytest.raises(ValueError, match="extra.weight"):
        convert_reference_layer(sd | {"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="prefix"):
        convert_reference_decoder({"model.x": torch.zeros(1)})
    bad = {f"transformer.decoder.layers.0.{k}": v for k, v in missing.items()}
    with pytest.raises(ValueError, match="layers.0"):
        convert_reference_decoder(bad)


def test_custom_route_names():
    sd = convert_reference_layer(
        reference_layer().state_dict(), ffn_route="r1", instruct_route="r3"
    )
    assert "aux.r1.ffn.linear1.weight" in sd and "aux.r3.self_attn.tokens" in sd
