"""MultiRouteDecoderLayer: packed routes equal an unpacked per-route oracle, routes are isolated."""

import pytest
import torch
from test_multi_route_oracle import (
    C,
    dino_mask,
    make_inputs,
    make_layer,
    oracle_route,
    run,
)

from mrdetr import routes

PRESETS = {"mr_detr": routes.mr_detr(num_instruction_tokens=3)} | {
    f"row{i}": routes.paper_ablation(i) for i in range(1, 13)
}
MIXED = (
    routes.Route("primary"),
    routes.Route("aux_sa_tokens", supervision="o2m", own_self_attn=True, num_instruction_tokens=2),
    routes.Route("aux_all", supervision="both", own_cross_attn=True, own_ffn=True),
    routes.Route("aux_tokens", supervision="o2m", num_instruction_tokens=4),
)


@pytest.mark.parametrize("name", list(PRESETS) + ["mixed"])
def test_packed_equals_per_route_oracle(name):
    rs = MIXED if name == "mixed" else PRESETS[name]
    layer = make_layer(rs)
    query, pos, ref, value = make_inputs(len(rs))
    out = run(layer, query, pos, ref, value)
    assert out.shape == query.shape
    for i in range(len(rs)):
        expected = oracle_route(layer, i, query[i], pos[i], ref[i], value)
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=1e-5, msg=rs[i].name)


@pytest.mark.parametrize("name", ["mr_detr", "mixed"])
def test_packed_equals_oracle_with_dino_mask(name):
    rs = MIXED if name == "mixed" else PRESETS[name]
    layer = make_layer(rs)
    query, pos, ref, value = make_inputs(len(rs), queries=10)
    mask, dn = dino_mask(10, 6, 3), 6
    out = run(layer, query, pos, ref, value, self_attn_mask=mask, num_denoising=dn)
    for i in range(len(rs)):
        expected = oracle_route(layer, i, query[i], pos[i], ref[i], value, mask, dn)
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=1e-5, msg=rs[i].name)


def test_denoising_queries_never_see_instructions():
    layer = make_layer(PRESETS["mr_detr"])
    query, pos, ref, value = make_inputs(3, queries=10)
    mask, dn = dino_mask(10, 6, 3), 6
    a = run(layer, query, pos, ref, value, self_attn_mask=mask, num_denoising=dn)
    with torch.no_grad():
        layer.aux["aux_instruct"].self_attn.tokens.add_(1.0)
    b = run(layer, query, pos, ref, value, self_attn_mask=mask, num_denoising=dn)
    torch.testing.assert_close(a[2, :, :dn], b[2, :, :dn], atol=1e-6, rtol=0)
    assert (a[2, :, dn:] - b[2, :, dn:]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(a[:2], b[:2], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["mr_detr", "row12", "mixed"])
@pytest.mark.parametrize("what", ["query", "pos", "ref"])
def test_changing_one_route_leaves_the_others(name, what):
    rs = MIXED if name == "mixed" else PRESETS[name]
    layer = make_layer(rs)
    inputs = list(make_inputs(len(rs)))
    base = run(layer, *inputs)
    k = {"query": 0, "pos": 1, "ref": 2}[what]
    for r in range(len(rs)):
        changed = [t.clone() for t in inputs]
        changed[k][r] = changed[k][r] * 0.5 + (0.1 if what == "ref" else 1.0)
        out = run(layer, *changed)
        for other in range(len(rs)):
            if other == r:
                assert (out[r] - base[r]).abs().max() > 1e-4
            else:
                torch.testing.assert_close(out[other], base[other], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, calls", [("mr_detr", 1), ("row4", 2), ("row12", 2)])
def test_value_projected_once_per_cross_attention_module(name, calls):
    layer = make_layer(PRESETS[name])
    seen = []
    for m in layer.modules():
        if hasattr(m, "value_proj"):
            m.value_proj.register_forward_hook(lambda *a: seen.append(1))
    run(layer, *make_inputs(len(PRESETS[name])))
    assert len(seen) == calls


def test_expanded_inputs_share_primary_queries():
    """Route-1 reusing the primary route's queries: an expanded (stride-0) tensor works."""
    layer = make_layer(PRESETS["mr_detr"])
    query, pos, ref, value = make_inputs(1)
    out = run(
        layer,
        query.expand(3, -1, -1, -1),
        pos.expand(3, -1, -1, -1),
        ref.expand(3, *ref.shape[1:]),
        value,
    )
    for i in range(3):
        torch.testing.assert_close(
            out[i], oracle_route(layer, i, query[0], pos[0], ref[0], value), atol=2e-5, rtol=1e-5
        )
    assert out.shape == (3, *query.shape[1:]) and query.shape[-1] == C
