"""The routing engine on its own: dispatch against a route-by-route loop, eval prefix, owned
modules built from the plan."""

import pytest
import torch
from torch import nn

from mrdetr import routes
from mrdetr.adapters import DecoderSpec
from mrdetr.routing import (
    OwnedModules,
    Part,
    RouteLayout,
    RoutePlan,
    RouteStack,
    dispatch,
    eval_prefix,
    tile,
)

PLAN = RoutePlan(routes.mr_detr())  # ffn packs: (0, 2) shared, (1,) aux_ffn's own


def _modules():
    torch.manual_seed(0)
    return {None: nn.Linear(4, 4), "aux_ffn": nn.Linear(4, 4)}


def _oracle_module(i):
    """Which module route ``i`` uses for the FFN, by the rule of mrdetr.routes (by hand)."""
    return "aux_ffn" if PLAN.routes[i].own_ffn else None


def test_dispatch_on_a_route_stack_equals_a_route_by_route_loop():
    mods, calls = _modules(), []
    x = torch.randn(3, 2, 5, 4)

    def run(pack, xs):
        calls.append(pack.routes)
        return mods[pack.owner](xs)

    got = dispatch(RouteStack(3), PLAN.packs("ffn"), run, x)
    want = torch.stack([mods[_oracle_module(i)](x[i]) for i in range(3)])
    torch.testing.assert_close(got, want)
    assert calls == [(0, 2), (1,)]  # one call per module, not per route


def test_dispatch_on_a_query_layout_with_denoising_equals_a_route_by_route_loop():
    mods = _modules()
    layout = RouteLayout(num_routes=3, num_queries=4, num_denoising=2, query_dim=1)
    x = tile(torch.randn(2, 6, 4), layout, 1)  # [B, dn + 3 * Q, C]
    got = dispatch(layout, PLAN.packs("ffn"), lambda p, xs: mods[p.owner](xs), x)
    bounds = [0, 6, 10, 14]  # the primary's slice keeps the denoising queries
    want = torch.cat(
        [mods[_oracle_module(i)](x[:, bounds[i] : bounds[i + 1]]) for i in range(3)], 1
    )
    torch.testing.assert_close(got, want)
    assert got.shape == (2, layout.length, 4)


def test_eval_prefix():
    q, pos = torch.randn(3, 2), None
    assert eval_prefix(True, 1, q, pos)[0] is q
    kept, none = eval_prefix(False, 2, q, pos)
    assert torch.equal(kept, q[:2]) and none is None
    assert eval_prefix(False, 3, q)[0] is q


def test_owned_modules_follow_the_plan_and_copy_the_primary():
    primary = {"ffn": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}

    def tokens(route):
        return nn.Parameter(torch.zeros(route.num_instruction_tokens, 4))

    parts = (
        Part("norm", "self_attn_norm", lambda r: nn.LayerNorm(4)),
        Part("tokens", "self_attn", tokens),
        Part("ffn", "ffn", lambda r: nn.Linear(4, 4)),
    )
    ffn_route, instruct_route = PLAN.routes[1], PLAN.routes[2]
    own_ffn = OwnedModules(PLAN, ffn_route, parts)
    own_instruct = OwnedModules(PLAN, instruct_route, parts)
    assert own_ffn.parts == ("ffn",) and own_instruct.parts == ("norm", "tokens")
    with torch.no_grad():
        primary["norm"].weight.add_(1.0)
    torch.manual_seed(0)
    own_ffn.copy_from(primary)
    own_instruct.copy_from(primary)
    assert torch.equal(own_ffn.ffn.weight, primary["ffn"].weight)
    assert own_ffn.ffn.weight is not primary["ffn"].weight
    assert torch.equal(own_instruct.norm.weight, primary["norm"].weight)
    assert own_instruct.tokens.abs().sum() > 0  # drawn ~ N(0, 1)
    assert set(own_instruct.state_dict()) == {"norm.weight", "norm.bias", "tokens"}


def test_decoder_spec_ffn_norm_is_deprecated_but_accepted():
    with pytest.warns(DeprecationWarning, match="ffn_norm"):
        spec = DecoderSpec("layers", "self_attn", "norm1", ("linear1", "linear2"), "norm3")
    assert spec.ffn == ("linear1", "linear2")
