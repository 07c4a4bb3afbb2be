"""Route-aware MoE FFN: per-query oracle, gradients, balancing loss, packing, strip."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_criterion import fixed, make_outputs
from test_multi_route_oracle import (
    SHAPES,
    STARTS,
    _norm,
    _self_attention,
    make_inputs,
    make_layer,
    run,
)

from mrdetr import MultiRouteCriterion, MultiRouteDecoderLayer, routes
from mrdetr.layers.moe import MoEFFN, load_balancing_loss
from mrdetr.routes import Route


def naive_moe(moe, x):
    """Per query: softmax router on x + route embedding, top-k experts, probability-weighted sum."""
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        p = (moe.router.weight @ (t + moe.route_embedding) + moe.router.bias).softmax(-1)
        top = sorted(range(len(p)), key=lambda e: (-float(p[e].detach()), e))[: moe.top_k]
        out.append(sum(p[e] * moe.experts[e](t[None])[0] for e in top))
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_moe_matches_per_query_oracle(top_k):
    torch.manual_seed(0)
    moe = MoEFFN(16, 32, num_experts=4, top_k=top_k).double()
    with torch.no_grad():
        moe.router.weight.normal_()  # decisive routing
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), naive_moe(moe, x))


def test_every_expert_receives_gradient_over_a_batch():
    torch.manual_seed(0)
    moe = MoEFFN(16, 32, num_experts=4, top_k=1)
    y, balance = moe.forward_with_balance_loss(torch.randn(4, 50, 16))
    (y.square().sum() + balance).backward()
    for e, expert in enumerate(moe.experts):
        assert expert.linear1.weight.grad.abs().sum() > 0, e
    assert moe.router.weight.grad.abs().sum() > 0 and moe.route_embedding.grad.abs().sum() > 0


def test_load_balancing_loss_hand_values_and_minimum():
    # uniform probabilities: 1 whatever the (tie-broken) assignment
    probs = torch.full((6, 3), 1 / 3)
    assert load_balancing_loss(probs, torch.zeros(6, 1, dtype=torch.long)) == pytest.approx(1.0)
    # hand case: E=2, tokens -> experts [0, 0, 1], P = mean probs = (0.6, 0.4):
    # 2 * (2/3 * 0.6 + 1/3 * 0.4) = 2 * (0.4 + 0.1333) = 1.0667
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    top = probs.argmax(-1, keepdim=True)
    assert load_balancing_loss(probs, top) == pytest.approx(2 * (2 / 3 * 0.6 + 1 / 3 * 0.4))
    # confident (one-hot) routing: the loss is E * sum(f^2), minimal (1) exactly for a uniform
    # load (Cauchy-Schwarz): every unbalanced load of 12 tokens over 4 experts gives more
    for load in ([3, 3, 3, 3], [4, 3, 3, 2], [6, 2, 2, 2], [12, 0, 0, 0], [6, 6, 0, 0]):
        idx = torch.repeat_interleave(torch.arange(4), torch.tensor(load))
        p = F.one_hot(idx, 4).float()
        value = load_balancing_loss(p, idx[:, None])
        assert value == pytest.approx(4 * sum((n / 12) ** 2 for n in load))
        assert value > 1.0 + 1e-6 or load == [3, 3, 3, 3]
    p = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(10, 4)
    assert load_balancing_loss(p, p.argmax(-1, keepdim=True)) == pytest.approx(4 * 0.97)
    # the module: a zero router is uniform, so its loss is exactly the minimum 1
    moe = MoEFFN(8, 16, num_experts=4)
    with torch.no_grad():
        moe.router.weight.zero_()
    assert moe.forward_with_balance_loss(torch.randn(30, 8))[1].item() == pytest.approx(1.0)


def moe_route_oracle(layer, index, query, pos, ref, value):
    """Route ``index`` (instruction tokens, own MoE FFN) run alone with plain ops."""
    aux = layer.aux[layer.routes[index].name]
    sa = _self_attention(
        layer.self_attn, query, pos, aux.self_attn.tokens, aux.self_attn.tokens_pos
    )
    x = _norm(aux.norm1, query + sa)
    x = _norm(layer.norm2, x + layer.cross_attn(x + pos, ref, value, SHAPES, STARTS))
    return _norm(layer.norm3, x + naive_moe(aux.ffn, x))


def run_balance(layer, query, pos, ref, value):
    return run(layer, query, pos, ref, value, return_balance_losses=True)


def test_packed_layer_equals_unpacked_oracle_and_strip():
    rs = routes.mr_detr_moe(num_instruction_tokens=3, num_experts=3, top_k=2)
    layer = make_layer(rs)
    query, pos, ref, value = make_inputs(3)
    out, losses = run_balance(layer, query, pos, ref, value)
    torch.testing.assert_close(run(layer, query, pos, ref, value), out, atol=0, rtol=0)
    torch.testing.assert_close(
        out[2], moe_route_oracle(layer, 2, query[2], pos[2], ref[2], value), atol=1e-5, rtol=1e-5
    )
    assert set(losses) == {"aux_instruct"} and losses["aux_instruct"].dim() == 0
    primary = out[0]
    # eval / primary alone: no MoE runs, no loss is reported
    assert run_balance(layer.eval(), query, pos, ref, value)[1] == {}
    # strip: no MoE parameter left; loads into a baseline layer with the same primary output
    layer.strip_auxiliary()
    assert not any(isinstance(m, MoEFFN) for m in layer.modules())
    assert not any("expert" in k or "router" in k for k in layer.state_dict())
    plain = make_layer(routes.baseline(), seed=5)
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(run(plain.eval(), query[:1], pos[:1], ref[:1], value)[0], primary)


def test_decoder_losses_reach_the_criterion():
    from mrdetr import MultiRouteDecoder

    torch.manual_seed(0)
    dec = MultiRouteDecoder(
        2, embed_dim=32, num_heads=4, ffn_dim=48, num_levels=2, num_points=2, dropout=0.0,
        routes=routes.mr_detr_moe(2), backend="pytorch",
    )  # fmt: skip
    query, pos, ref, value = make_inputs(3)
    moe = dec(query, reference_points=ref[:, :, :, 0], value=value, spatial_shapes=SHAPES,
              level_start_index=STARTS, query_pos=pos).balance_losses  # fmt: skip
    assert set(moe) == {"aux_instruct"}
    x, per_layer = query, []  # oracle: every layer's own loss, by hand, averaged
    ref0 = ref[:, :, :, :1].expand_as(ref)  # the decoder gives every level the level-0 point
    for layer in dec.layers:
        x, balance = run_balance(layer, x, pos, ref0, value)
        per_layer.append(balance["aux_instruct"])
    torch.testing.assert_close(moe["aux_instruct"], torch.stack(per_layer).mean())
    out, targets = make_outputs(0)
    crit = MultiRouteCriterion(3, {"primary": fixed([([0], [0]), ([1], [1])])},
                               weight_dict={"loss_moe": 0.5})  # fmt: skip
    plain = crit({"primary": out}, targets)["loss"]
    losses = crit({"primary": {**out, "loss_moe": moe["aux_instruct"]}}, targets)
    torch.testing.assert_close(losses["loss"], plain + 0.5 * moe["aux_instruct"])
    losses["loss"].backward()
    router = dec.layers[0].aux["aux_instruct"].ffn.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss_moe"):
        crit({"primary": {**out, "loss_moe": torch.ones(2)}}, targets)


def test_copy_pickle_after_forward_and_inference_mode():
    torch.manual_seed(0)
    moe = MoEFFN(8, 16, num_experts=3, top_k=2)
    x = torch.randn(5, 8)
    y, balance = moe.forward_with_balance_loss(x)
    assert balance.requires_grad and not hasattr(moe, "aux_loss")  # nothing kept on the module
    for other in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        with torch.inference_mode():
            torch.testing.assert_close(other(x), y.detach())
    layer = MultiRouteDecoderLayer(32, 4, 48, 2, 2, 0.0, routes=routes.mr_detr_moe(2))
    assert isinstance(layer.aux["aux_instruct"].ffn, MoEFFN)


def test_route_validation():
    with pytest.raises(ValueError, match="own_ffn"):
        Route("a", supervision="o2m", ffn_experts=4)
    with pytest.raises(ValueError, match="ffn_experts"):
        Route("a", supervision="o2m", own_ffn=True, ffn_experts=1)
    with pytest.raises(ValueError, match="ffn_top_k"):
        Route("a", supervision="o2m", own_ffn=True, ffn_experts=2, ffn_top_k=3)
    with pytest.raises(ValueError, match="num_experts"):
        MoEFFN(8, 16, num_experts=1)
    with pytest.raises(ValueError, match="top_k"):
        MoEFFN(8, 16, num_experts=2, top_k=0)
