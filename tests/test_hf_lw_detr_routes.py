"""LW-DETR / RF-DETR routes against route-by-route oracles (transformers 5.x).

Oracles: a copy of the unwrapped model with one route's modules put in (its FFN copy, or its
self-attention norm copy and a hand-written self-attention with the instruction tokens, within
each Group DETR group), run by transformers' own code; the family's own Hungarian loss.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")

from mrdetr import adapters, routes  # noqa: E402
from mrdetr.adapters.host_loss import host_route_loss  # noqa: E402
from mrdetr.testing.hf_families import family_available, tiny_batch, tiny_model  # noqa: E402

FAMILIES = [f for f in ("lw_detr", "rf_detr") if family_available(f)]
pytestmark = pytest.mark.skipif(not FAMILIES, reason="transformers has no LW-DETR / RF-DETR")
ROUTES = routes.mr_detr(num_instruction_tokens=3)


def _wrapped(family, **kwargs):
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    adapters.wrap(model, ROUTES, **kwargs)
    decoder = model.model.decoder
    with torch.no_grad():  # route copies differ from the host's modules
        for p in decoder.mrdetr_routes.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, plain, decoder.mrdetr_routes


def _oracle_attention(attn, tokens, tokens_pos):
    """Hand-written self-attention of ``attn``'s weights with instruction tokens in front of the
    keys, each group of ``config.group_detr`` queries separately."""
    heads = attn.q_proj.out_features // attn.head_dim

    def forward(hidden_states, position_embeddings=None, **kwargs):
        b, length, c = hidden_states.shape
        g = attn.config.group_detr
        outs = []
        for x, pos in zip(hidden_states.split(length // g, 1),
                          position_embeddings.split(length // g, 1), strict=True):  # fmt: skip
            t = tokens.expand(b, -1, -1)
            q = attn.q_proj(x + pos)
            k = attn.k_proj(torch.cat([t + tokens_pos, x + pos], 1))
            v = attn.v_proj(torch.cat([t, x], 1))
            q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))
            w = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1)
            outs.append(attn.o_proj((w @ v).transpose(1, 2).flatten(2)))
        return torch.cat(outs, 1), None

    return forward


def _route_oracle(plain, owned, route):
    oracle = copy.deepcopy(plain)
    for layer, own in zip(oracle.model.decoder.layers, owned.aux, strict=True):
        mods = own[route]
        if hasattr(mods, "ffn"):
            layer.mlp = mods.ffn[0]
        if hasattr(mods, "self_attn_norm"):
            layer.self_attn_layer_norm = mods.self_attn_norm
        if hasattr(mods, "tokens"):
            layer.self_attn.forward = _oracle_attention(
                layer.self_attn, mods.tokens, mods.tokens_pos
            )
    return oracle


@pytest.mark.parametrize("family", FAMILIES)
def test_every_route_equals_its_oracle(family):
    model, plain, owned = _wrapped(family, route_weights={"aux_ffn": 0.0, "aux_instruct": 0.0})
    batch = tiny_batch(model)
    out = model(**batch)
    ro = adapters.route_outputs(model)
    g, q = model.config.group_detr, model.config.num_queries
    assert ro.hidden_states.shape[:2] == (2, 3) and ro.hidden_states.shape[3] == g * q
    want = plain(**batch, output_hidden_states=True)
    torch.testing.assert_close(ro.hidden_states[:, 0], want.intermediate_hidden_states)
    assert torch.equal(out.logits, want.logits)
    for r, route in enumerate(("aux_ffn", "aux_instruct"), start=1):
        oracle = _route_oracle(plain, owned, route)(**batch)
        torch.testing.assert_close(ro.hidden_states[:, r], oracle.intermediate_hidden_states)
        # the route's predictions: the detector's shared heads, every layer (final norm applied)
        preds = adapters.hf_route_predictions(model, ro)[route]
        torch.testing.assert_close(preds["pred_logits"], oracle.logits)
        torch.testing.assert_close(preds["pred_boxes"], oracle.pred_boxes)


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_never_see_each_other_in_any_route(family):
    """Changing group 1's queries leaves every route's group 0 unchanged."""
    model, _, _ = _wrapped(family)
    decoder = model.model.decoder
    captured = {}
    hook = decoder.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    model(**tiny_batch(model))
    hook.remove()
    adapters.route_outputs(model)
    q = model.config.num_queries
    runs = []
    for shift in (0.0, 1.0):
        kw = dict(captured)
        x = kw["inputs_embeds"].clone()
        x[:, q:] += shift
        kw["inputs_embeds"] = x
        decoder(**kw)
        runs.append(adapters.route_outputs(model).hidden_states)
    assert torch.equal(runs[0][..., :q, :], runs[1][..., :q, :])
    assert not torch.allclose(runs[0][..., q:, :], runs[1][..., q:, :])


@pytest.mark.parametrize("family", FAMILIES)
def test_host_loss_row_reproduces_the_models_own_loss(family):
    """The family's own Hungarian matcher through host_route_loss on the primary route's
    predictions (encoder proposals included) gives the unwrapped model's loss."""
    from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher

    model, _, _ = _wrapped(family, route_weights={"aux_ffn": 0.0, "aux_instruct": 0.0})
    batch = tiny_batch(model)
    out = model(**batch)
    preds = adapters.hf_route_predictions(model, adapters.route_outputs(model), out)
    c = model.config
    matcher = LwDetrHungarianMatcher(
        class_cost=c.class_cost, bbox_cost=c.bbox_cost, giou_cost=c.giou_cost
    )
    loss, terms = host_route_loss(model, preds["primary"], batch["labels"], matcher)
    assert terms.keys() == out.loss_dict.keys()
    torch.testing.assert_close(loss, out.loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_route_losses_are_one_to_many_within_groups(family):
    """Each auxiliary route's terms (IoU-aware BCE ``loss_ce``, boxes, every layer) are in
    ``loss_dict``; the encoder stand-in terms are not; the total adds them with the weights."""
    weights = {"aux_ffn": 1.0, "aux_instruct": 0.5}
    model, _, _ = _wrapped(family, route_weights=weights)
    batch = tiny_batch(model)
    torch.manual_seed(0)
    out = model(**batch)
    for route in weights:
        keys = {k.split("/", 1)[1] for k in out.loss_dict if k.startswith(f"{route}/")}
        assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= keys, keys
        assert not any(k.endswith("_enc") for k in keys)
    c = model.config
    w = {"loss_ce": c.class_loss_coefficient, "loss_bbox": c.bbox_loss_coefficient,
         "loss_giou": c.giou_loss_coefficient}  # fmt: skip

    def total(prefix: str):  # the family's weighted sum of the terms under ``prefix``
        terms = {k.removeprefix(prefix): v for k, v in out.loss_dict.items()}
        terms = {k: v for k, v in terms.items() if prefix + k in out.loss_dict and "/" not in k}
        return sum(w.get(k.rstrip("_0123456789").removesuffix("_enc"), 0.0) * v
                   for k, v in terms.items())  # fmt: skip

    routes_part = sum(weights[r] * total(f"{r}/") for r in weights)
    own = total("")
    torch.testing.assert_close(out.loss, own + routes_part)
