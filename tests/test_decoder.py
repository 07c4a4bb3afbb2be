"""MultiRouteDecoder: stacking, box refinement, look-forward-twice, strip, input errors."""

import pytest
import torch
from test_multi_route_oracle import HEADS, LEVELS, POINTS, SHAPES, STARTS, C

from mrdetr import routes
from mrdetr.layers.decoder import MultiRouteDecoder, inverse_sigmoid

NUM_LAYERS, B, Q = 3, 2, 8


def make_decoder(rs=None, **kwargs):
    torch.manual_seed(0)
    dec = MultiRouteDecoder(
        NUM_LAYERS, embed_dim=C, num_heads=HEADS, ffn_dim=48, num_levels=LEVELS,
        num_points=POINTS, dropout=0.0, routes=rs or routes.mr_detr(3), backend="pytorch",
        **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return dec


def make_inputs(r=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(r, B, Q, C, generator=g)
    pos = torch.randn(r, B, Q, C, generator=g)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(r, B, Q, 2, generator=g),
                       0.1 + 0.2 * torch.rand(r, B, Q, 2, generator=g)], -1)  # fmt: skip
    value = torch.randn(B, int(SHAPES.prod(1).sum()), C, generator=g)
    ratios = 0.7 + 0.3 * torch.rand(B, LEVELS, 2, generator=g)
    return query, pos, boxes, value, ratios


def box_heads(seed=2):
    torch.manual_seed(seed)
    return torch.nn.ModuleList(torch.nn.Linear(C, 4) for _ in range(NUM_LAYERS))


def decode(dec, query, pos, boxes, value, ratios, **kwargs):
    return dec(
        query, reference_points=boxes, value=value, spatial_shapes=SHAPES,
        level_start_index=STARTS, valid_ratios=ratios, query_pos=pos, **kwargs,
    )  # fmt: skip


def test_inverse_sigmoid_hand_values():
    x = torch.tensor([-3.0, 0.0, 2.0])
    torch.testing.assert_close(inverse_sigmoid(torch.sigmoid(x)), x, atol=1e-4, rtol=0)
    assert inverse_sigmoid(torch.tensor(0.5)).item() == 0.0
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0]))).all()


def test_box_refinement_matches_a_plain_loop():
    dec, heads = make_decoder(), box_heads()
    query, pos, boxes, value, ratios = make_inputs()
    out = decode(dec, query, pos, boxes, value, ratios, box_heads=heads)
    assert out.hidden_states.shape == (NUM_LAYERS, 3, B, Q, C)
    assert out.reference_points.shape == (NUM_LAYERS, 3, B, Q, 4)
    x, ref = query, boxes
    for i, layer in enumerate(dec.layers):
        scaled = ref[:, :, :, None] * torch.cat([ratios, ratios], -1)[None, :, None]
        x = layer(x, query_pos=pos, reference_points=scaled, value=value,
                  spatial_shapes=SHAPES, level_start_index=STARTS)  # fmt: skip
        torch.testing.assert_close(out.hidden_states[i], x)
        torch.testing.assert_close(out.reference_points[i], ref)
        logit = torch.log(ref / (1 - ref))
        ref = torch.sigmoid(heads[i](x) + logit).detach()


def test_without_box_heads_reference_points_stay():
    dec = make_decoder(return_intermediate=False)
    query, pos, boxes, value, ratios = make_inputs()
    out = decode(dec, query, pos, boxes, value, ratios)
    assert out.hidden_states.shape == (1, 3, B, Q, C)
    torch.testing.assert_close(out.reference_points[0], boxes, atol=0, rtol=0)


@pytest.mark.parametrize("lft", [False, True])
def test_look_forward_twice_gradient_reaches_previous_box_head(lft):
    dec, heads = make_decoder(look_forward_twice=lft), box_heads()
    query, pos, boxes, value, ratios = make_inputs()
    out = decode(dec, query, pos, boxes, value, ratios, box_heads=heads)
    box1 = torch.sigmoid(heads[1](out.hidden_states[1]) + inverse_sigmoid(out.reference_points[1]))
    box1.sum().backward()
    reached = heads[0].weight.grad is not None and heads[0].weight.grad.any()
    assert bool(reached) == lft
    assert heads[1].weight.grad.any()


def test_query_pos_head_gets_scaled_level0_points():
    dec = make_decoder(rs=routes.baseline())
    query, _, boxes, value, ratios = make_inputs(r=1)
    seen = []

    def pos_head(points):
        seen.append(points)
        return points.sum(-1, keepdim=True).expand(*points.shape[:-1], C)

    decode(dec, query, None, boxes, value, ratios, query_pos_head=pos_head)
    assert len(seen) == NUM_LAYERS
    torch.testing.assert_close(seen[0], boxes * torch.cat([ratios, ratios], -1)[None, :, None, 0])


def test_eval_runs_primary_only_and_matches_training():
    dec, heads = make_decoder(), box_heads()
    inputs = make_inputs()
    train = decode(dec.train(), *inputs, box_heads=heads)
    ev = decode(dec.eval(), *inputs, box_heads=heads)
    assert ev.hidden_states.shape[1] == 1
    torch.testing.assert_close(ev.hidden_states[:, 0], train.hidden_states[:, 0])
    torch.testing.assert_close(ev.reference_points[:, 0], train.reference_points[:, 0])


def test_strip_and_reload_into_baseline_decoder():
    dec, heads = make_decoder(), box_heads()
    inputs = make_inputs()
    before = decode(dec.eval(), *inputs, box_heads=heads)
    dec.strip_auxiliary()
    assert dec.routes == routes.baseline() and not any("aux" in k for k in dec.state_dict())
    plain = MultiRouteDecoder(
        NUM_LAYERS, embed_dim=C, num_heads=HEADS, ffn_dim=48, num_levels=LEVELS,
        num_points=POINTS, routes=routes.baseline(), backend="pytorch",
    ).eval()  # fmt: skip
    plain.load_state_dict(dec.state_dict(), strict=True)
    primary = [t[:1] for t in inputs[:3]] + list(inputs[3:])
    after = decode(plain, *primary, box_heads=heads)
    torch.testing.assert_close(after.hidden_states, before.hidden_states, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(box_heads=box_heads()[:2]), "box_heads"),
        (dict(valid_ratios=torch.ones(B, LEVELS + 1, 2)), "valid_ratios"),
        (dict(reference_points=torch.rand(3, B, Q, 2), box_heads=box_heads()), "box refinement"),
        (dict(reference_points=torch.rand(3, B, Q + 1, 4)), "reference_points"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    dec = make_decoder()
    query, pos, boxes, value, ratios = make_inputs()
    args = dict(query_pos=pos, reference_points=boxes, valid_ratios=ratios) | kwargs
    with pytest.raises(ValueError, match=match):
        dec(query, value=value, spatial_shapes=SHAPES, level_start_index=STARTS, **args)
    with pytest.raises(ValueError, match="num_layers"):
        MultiRouteDecoder(0)
