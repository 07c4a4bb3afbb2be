"""MultiRouteDecoderLayer: eval/primary-only behaviour, gradients, presets, strip, input errors."""

import pytest
import torch
from test_multi_route_oracle import C, make_inputs, make_layer, run

from mrdetr import routes
from mrdetr.layers.multi_route import MultiRouteDecoderLayer


def _forbid_aux(layer):
    def boom(module, args):
        raise AssertionError(f"auxiliary module {type(module).__name__} ran")

    return [m.register_forward_pre_hook(boom) for m in layer.aux.modules()]


def test_eval_equals_primary_route_of_training():
    layer = make_layer(routes.mr_detr(3))
    query, pos, ref, value = make_inputs(3)
    train_out = run(layer.train(), query, pos, ref, value)
    _forbid_aux(layer)
    eval_out = run(layer.eval(), query, pos, ref, value)
    assert eval_out.shape == (1, *query.shape[1:])
    torch.testing.assert_close(eval_out[0], train_out[0], atol=1e-6, rtol=0)
    alone = run(layer, query[:1], pos[:1], ref[:1], value)
    torch.testing.assert_close(alone, eval_out, atol=0, rtol=0)


def test_one_route_in_training_touches_no_auxiliary_module():
    layer = make_layer(routes.paper_ablation(12)).train()
    query, pos, ref, value = make_inputs(4)
    full = run(layer, query, pos, ref, value)
    _forbid_aux(layer)
    primary = run(layer, query[:1], pos[:1], ref[:1], value)
    torch.testing.assert_close(primary[0], full[0], atol=1e-6, rtol=0)


def test_dropout_is_off_in_eval():
    layer = make_layer(routes.mr_detr(3), dropout=0.5)
    inputs = make_inputs(3)
    a, b = run(layer.eval(), *inputs), run(layer, *inputs)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    t1, t2 = run(layer.train(), *inputs), run(layer, *inputs)
    assert (t1 - t2).abs().max() > 1e-3


@pytest.mark.parametrize("rs", [routes.mr_detr(3), routes.paper_ablation(12)], ids=["mr", "r12"])
def test_primary_loss_gives_no_gradient_to_auxiliary_parameters(rs):
    layer = make_layer(rs)
    out = run(layer, *make_inputs(len(rs)))
    out[0].square().sum().backward(retain_graph=True)
    for name, p in layer.named_parameters():
        if name.startswith("aux."):
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.any(), name
    layer.zero_grad(set_to_none=True)
    out[1:].square().sum().backward()  # the auxiliary losses do reach their own parameters
    assert all(p.grad is not None and p.grad.any() for p in layer.aux.parameters())


def _expected_aux_modules(route):
    own = set()
    if route.num_instruction_tokens:
        own |= {"self_attn.tokens", "self_attn.tokens_pos", "norm1"}
        if route.own_self_attn:
            own.add("self_attn.attn")
    elif route.own_self_attn:
        own.add("self_attn")
    if route.own_cross_attn:
        own.add("cross_attn")
    if route.own_ffn:
        own.add("ffn")
    return own


def _aux_modules(layer, name):
    """Owned parts under aux.<name>: top module, or self_attn.<part> for instructive attention."""
    parts = set()
    for key in layer.aux[name].state_dict():
        bits = key.split(".")
        if bits[0] == "self_attn" and bits[1] in ("tokens", "tokens_pos", "attn"):
            parts.add(".".join(bits[:2]))
        else:
            parts.add(bits[0])
    return parts


PRESETS = [routes.mr_detr()] + [routes.paper_ablation(i) for i in range(1, 13)]


@pytest.mark.parametrize("rs", PRESETS, ids=["mr_detr"] + [f"row{i}" for i in range(1, 13)])
def test_presets_run_and_own_the_right_parameters(rs):
    layer = MultiRouteDecoderLayer(C, 4, 48, 2, 2, routes=rs, backend="pytorch")
    assert list(layer.aux) == [r.name for r in rs[1:]]
    size = {
        "self_attn": sum(p.numel() for p in layer.self_attn.parameters()),
        "cross_attn": sum(p.numel() for p in layer.cross_attn.parameters()),
        "ffn": sum(p.numel() for p in layer.ffn.parameters()),
    }
    for r in rs[1:]:
        assert _aux_modules(layer, r.name) == _expected_aux_modules(r), r.name
        for part in ("self_attn", "cross_attn", "ffn"):
            if part in _expected_aux_modules(r):
                own = getattr(layer.aux[r.name], part)
                assert sum(p.numel() for p in own.parameters()) == size[part]
    out = run(layer, *make_inputs(len(rs)))
    assert out.shape[0] == len(rs) and torch.isfinite(out).all()


def test_instruction_tokens_shape_per_layer():
    layer = make_layer(routes.mr_detr(num_instruction_tokens=5))
    sa = layer.aux["aux_instruct"].self_attn
    assert sa.tokens.shape == (5, C) and sa.tokens_pos.shape == (5, C)


def test_strip_auxiliary_and_reload_into_baseline():
    layer = make_layer(routes.mr_detr(3)).eval()
    inputs = make_inputs(3)
    before = run(layer, *inputs)
    stripped = layer.strip_auxiliary()
    assert stripped is layer and layer.routes == (routes.mr_detr()[0],)
    assert not any(k.startswith("aux") for k in layer.state_dict())
    plain = MultiRouteDecoderLayer(C, 4, 48, 2, 2, 0.0, routes=routes.baseline(), backend="pytorch")
    plain.load_state_dict(layer.state_dict(), strict=True)
    primary_inputs = [t[:1] for t in inputs[:3]] + [inputs[3]]
    torch.testing.assert_close(run(plain.eval(), *primary_inputs), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="R=1"):
        run(layer.train(), *inputs)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, p, r, v: (q[:2], p[:2], r[:2], v), "R=3"),
        (lambda q, p, r, v: (q[..., :-1], p, r, v), "query"),
        (lambda q, p, r, v: (q, p[:, :, :-1], r, v), "query_pos"),
        (lambda q, p, r, v: (q, p, r[..., :3], v), "reference_points"),
        (lambda q, p, r, v: (q, p, r[:, :, :, :1], v), "reference_points"),
        (lambda q, p, r, v: (q, p, r, v[:1]), "value"),
        (lambda q, p, r, v: (q[0], p[0], r[0], v), "query"),
    ],
)
def test_bad_inputs_raise_value_error(change, match):
    layer = make_layer(routes.mr_detr(3))
    with pytest.raises(ValueError, match=match):
        run(layer, *change(*make_inputs(3)))


def test_bad_self_attn_mask_raises():
    layer = make_layer(routes.mr_detr(3))
    query, pos, ref, value = make_inputs(3, queries=9)
    with pytest.raises(ValueError, match="attn_mask"):
        run(layer, query, pos, ref, value, self_attn_mask=torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_denoising"):
        run(layer, query, pos, ref, value, num_denoising=10)


def test_reset_parameters_keeps_each_module_scheme():
    layer = make_layer(routes.mr_detr(3))
    with torch.no_grad():
        layer.aux["aux_instruct"].self_attn.tokens.zero_()
    layer.reset_parameters()
    ca = layer.cross_attn
    assert not ca.sampling_offsets.weight.any() and not ca.attention_weights.bias.any()
    assert not layer.self_attn.out_proj.bias.any() and not layer.self_attn.in_proj_bias.any()
    torch.testing.assert_close(layer.norm1.weight, torch.ones(C))
    tokens = layer.aux["aux_instruct"].self_attn.tokens
    assert 0.5 < tokens.std().item() < 1.5  # N(0, 1) again
