"""mrdetr.adapters: the route plan, an explicit DecoderSpec (DETR-style custom decoder), mrdetr's
own MultiRouteDecoder, route_predictions, and instructive attention through HF-style q/k/v."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _adapter_oracle import randomise, route_copy
from test_decoder import B, Q, box_heads, decode, make_inputs
from test_decoder import make_decoder as make_mr_decoder
from test_multi_route_oracle import C
from torch import nn

from mrdetr import adapters, routes
from mrdetr.adapters import DecoderSpec, SpecIntegration
from mrdetr.layers import inverse_sigmoid
from mrdetr.routing import Pack, RoutePlan, attention_weights, instructive_attend


def test_route_plan_packs_by_hand():
    plan = RoutePlan(routes.mr_detr())
    assert plan.packs("ffn") == (Pack(None, (0, 2)), Pack("aux_ffn", (1,)))
    assert plan.packs("self_attn") == (Pack(None, (0, 1)), Pack("aux_instruct", (2,)))
    assert plan.packs("self_attn_norm") == plan.packs("self_attn")
    assert plan.packs("cross_attn") == (Pack(None, (0, 1, 2)),)
    assert plan.packs("ffn", 1) == (Pack(None, (0,)),)
    assert [r.name for r in plan.owners("ffn")] == ["aux_ffn"]
    with pytest.raises(ValueError, match="sublayer"):
        plan.packs("mlp")


# --- an explicit spec: a DETR-style decoder no integration knows ---------------------------


class DetrLayer(nn.Module):
    def __init__(self, d=C, h=4, f=48):
        super().__init__()
        self.self_attn, self.cross = nn.MultiheadAttention(d, h), nn.MultiheadAttention(d, h)
        self.linear1, self.linear2 = nn.Linear(d, f), nn.Linear(f, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, tgt, memory, tgt_mask=None, pos=None, query_pos=None):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt, attn_mask=tgt_mask)[0])
        tgt = self.norm2(tgt + self.cross(tgt + query_pos, memory + pos, memory)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class DetrDecoder(nn.Module):
    """Sequence-first, returns every layer stacked ``[N, Q, B, C]`` (DETR's convention)."""

    def __init__(self, n=2):
        super().__init__()
        self.layers = nn.ModuleList(DetrLayer() for _ in range(n))
        self.norm = nn.LayerNorm(C)

    def forward(self, tgt, memory, tgt_mask=None, pos=None, query_pos=None):
        out, inter = tgt, []
        for layer in self.layers:
            out = layer(out, memory, tgt_mask, pos, query_pos)
            inter.append(self.norm(out))
        return torch.stack(inter)


class Detr(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.decoder = DetrDecoder()


SPEC = DecoderSpec(
    decoder="transformer.decoder", layers="layers", self_attn="self_attn",
    self_attn_norm="norm1", ffn=("linear1", "linear2"),
    query_inputs={"tgt": 0, "query_pos": 0}, batch_first=False, output_query_dim=1,
)  # fmt: skip


def detr_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    tgt, qpos = torch.randn(Q, B, C, generator=g), torch.randn(Q, B, C, generator=g)
    mem, pos = torch.randn(11, B, C, generator=g), torch.randn(11, B, C, generator=g)
    mask = torch.rand(Q, Q, generator=g) > 0.7
    mask.fill_diagonal_(False)
    return (tgt, mem), dict(tgt_mask=mask, pos=pos, query_pos=qpos)


def test_spec_decoder_packed_equals_oracle_and_eval_is_original():
    torch.manual_seed(0)
    model = Detr()
    plain = copy.deepcopy(model)
    with pytest.raises(TypeError, match="DecoderSpec"):
        adapters.wrap(model)
    adapters.wrap(model, routes.mr_detr(num_instruction_tokens=2), spec=SPEC)
    randomise(model)
    plain.load_state_dict(model.state_dict(), strict=False)
    args, kw = detr_inputs()
    dec = model.transformer.decoder
    model.eval(), plain.eval()
    assert torch.equal(dec(*args, **kw), plain.transformer.decoder(*args, **kw))
    model.train()
    out = dec(*args, **kw)
    got = adapters.route_outputs(model)
    assert out.shape == (2, Q, B, C)
    for i, route in enumerate(got.routes):
        oracle = route_copy(model, "transformer.decoder", SpecIntegration(SPEC), i)
        want = oracle.transformer.decoder(*args, **kw)
        have = out if i == 0 else got.outputs[route.name]
        torch.testing.assert_close(have, want, atol=2e-5, rtol=1e-5, msg=route.name)
    adapters.unwrap(model)
    assert set(model.state_dict()) == set(plain.state_dict())


def test_spec_paths_that_do_not_exist_are_named():
    bad = DecoderSpec(**{**SPEC.__dict__, "self_attn_norm": "norm9"})
    with pytest.raises(ValueError, match=r"spec.self_attn_norm.*'norm9'.*norm1"):
        adapters.wrap(Detr(), spec=bad)


# --- mrdetr's own MultiRouteDecoder --------------------------------------------------------


def test_wrapping_a_baseline_multi_route_decoder_equals_a_native_one():
    dec = make_mr_decoder(routes.baseline())
    plain = copy.deepcopy(dec)
    rs = routes.mr_detr(3)
    adapters.wrap(dec, rs)
    for layer in dec.layers:  # owned FFN copied from the primary's
        assert torch.equal(layer.aux["aux_ffn"].ffn.linear1.weight, layer.ffn.linear1.weight)
    randomise(dec)
    native = make_mr_decoder(rs)
    native.load_state_dict(dec.state_dict())  # same keys as a decoder built with the routes
    query, pos, boxes, value, ratios = make_inputs(r=1)
    heads = box_heads()
    out = decode(dec, query, pos, boxes, value, ratios, box_heads=heads)
    got = adapters.route_outputs(dec)
    three = [t.expand(3, *t.shape[1:]) for t in (query, pos, boxes)]
    want = decode(native, three[0], three[1], three[2], value, ratios, box_heads=heads)
    assert out.hidden_states.shape[1] == 1
    torch.testing.assert_close(got.hidden_states, want.hidden_states, atol=0, rtol=0)
    torch.testing.assert_close(got.boxes, want.boxes, atol=0, rtol=0)
    torch.testing.assert_close(out.hidden_states, want.hidden_states[:, :1], atol=0, rtol=0)
    dec.eval(), plain.eval()
    plain.load_state_dict(dec.state_dict(), strict=False)
    e1 = decode(dec, query, pos, boxes, value, ratios, box_heads=heads)
    e2 = decode(plain, query, pos, boxes, value, ratios, box_heads=heads)
    assert torch.equal(e1.hidden_states, e2.hidden_states)
    adapters.unwrap(dec)
    assert set(dec.state_dict()) == set(plain.state_dict())
    assert dec.routes == routes.baseline()


@pytest.mark.parametrize("lft", [False, True])
def test_decoder_boxes_and_route_predictions_match_the_hand_loop(lft):
    dec = make_mr_decoder(look_forward_twice=lft)
    heads = box_heads()
    cls = nn.ModuleList(nn.Linear(C, 5) for _ in range(3))
    out = decode(dec, *make_inputs(), box_heads=heads)
    preds = adapters.route_predictions(out, cls, routes=dec.routes)
    by_hand = adapters.route_predictions(out._replace(boxes=None), cls, heads, routes=dec.routes)
    for i, route in enumerate(dec.routes):
        for layer in range(3):  # the hand formula of examples/train_step.py
            h, ref = out.hidden_states[layer, i], out.reference_points[layer, i]
            want = (heads[layer](h) + inverse_sigmoid(ref)).sigmoid()
            sets = [*preds[route.name]["aux_outputs"], preds[route.name]]
            hand = [*by_hand[route.name]["aux_outputs"], by_hand[route.name]]
            torch.testing.assert_close(sets[layer]["pred_boxes"], want, atol=1e-6, rtol=0)
            torch.testing.assert_close(hand[layer]["pred_boxes"], want, atol=1e-6, rtol=0)
            assert torch.equal(sets[layer]["pred_logits"], cls[layer](h))
    if lft:  # the last layer's box loss reaches the previous box head through the box
        preds[dec.routes[0].name]["pred_boxes"].sum().backward()
        assert heads[1].weight.grad is not None and heads[1].weight.grad.any()


def test_route_predictions_two_dim_reference_shifts_the_centre_only():
    h = torch.randn(1, 1, B, Q, C)
    ref = torch.rand(1, 1, B, Q, 2) * 0.8 + 0.1
    head = nn.Linear(C, 4)
    out = adapters.RouteOutputs(routes.baseline(), h, reference_points=ref)
    boxes = adapters.route_predictions(out, nn.Linear(C, 3), head)["primary"]["pred_boxes"]
    delta = head(h[0, 0])
    want = torch.cat([delta[..., :2] + inverse_sigmoid(ref[0, 0]), delta[..., 2:]], -1).sigmoid()
    torch.testing.assert_close(boxes, want)


# --- instruction tokens through separate q/k/v projections (HF layout) --------------------


class HFStyleAttention(nn.Module):
    def __init__(self, d=C, h=4):
        super().__init__()
        self.num_heads = h
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)


def test_instructive_attention_separate_and_fused_projections_agree_with_torch():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(C, 4, batch_first=True)
    randomise(mha)
    hf = HFStyleAttention()
    with torch.no_grad():
        for lin, w, b in zip((hf.q_proj, hf.k_proj, hf.v_proj), mha.in_proj_weight.chunk(3),
                             mha.in_proj_bias.chunk(3), strict=True):  # fmt: skip
            lin.weight.copy_(w), lin.bias.copy_(b)
        hf.o_proj.load_state_dict(mha.out_proj.state_dict())
    x, pos = torch.randn(B, Q, C), torch.randn(B, Q, C)
    tok, tok_pos = torch.randn(3, C), torch.randn(3, C)
    mask = torch.rand(Q, Q) > 0.6
    mask.fill_diagonal_(False)
    keys = torch.cat([(tok + tok_pos).expand(B, 3, C), x + pos], 1)
    vals = torch.cat([tok.expand(B, 3, C), x], 1)
    want = mha(x + pos, keys, vals, attn_mask=F.pad(mask, (3, 0)), need_weights=False)[0]
    for module in (mha, hf):
        got = instructive_attend(x + pos, x + pos, x, attention_weights(module),
                                 tok + tok_pos, tok, attn_mask=mask)[0]  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="q_proj"):
        attention_weights(nn.Linear(C, C))
    with pytest.raises(TypeError, match="must be bool"):
        instructive_attend(x, x, x, attention_weights(mha), attn_mask=mask.long())
