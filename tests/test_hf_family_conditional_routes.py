"""HF Conditional-DETR and DAB-DETR: each route's predictions against a route-by-route oracle.

Oracles: the unwrapped model (a deep copy taken before ``wrap``) run alone with one route's
modules put in place of the host's. For the instruction route its self-attention is replaced by
attention written here from the raw weights of the family's own projections: queries
``q_content(h) + q_pos(pos)``, keys ``[k_content(tokens) + k_pos(tokens_pos) ; k_content(h) +
k_pos(pos)]``, values ``[v(tokens) ; v(h)]`` (Conditional-DETR 5.x: the module's
``*_content_proj``/``*_pos_proj``; 4.57: the layer's ``sa_*`` projections; DAB-DETR: the
self-attention wrapper's ``self_attn_*_proj``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")

from mrdetr import adapters, routes  # noqa: E402
from mrdetr.adapters import hf_route_predictions  # noqa: E402
from mrdetr.adapters.hf.content_position import (  # noqa: E402
    ContentPositionCall,
    ProjectedAttentionCall,
)
from mrdetr.testing.hf_families import family_available, tiny_batch, tiny_model  # noqa: E402

FAMILIES = [f for f in ("conditional_detr", "dab_detr") if family_available(f)]
ROUTES = routes.mr_detr(num_instruction_tokens=3)
AUX = [r.name for r in ROUTES[1:]]


def _attend(q, k, v, heads: int, out):
    """Softmax attention of ``q [B, Q, C]`` over ``k, v [B, S, C]``, heads split, ``out``."""
    b, nq, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return out((w @ vh).transpose(1, 2).reshape(b, nq, c))


def _with_tokens(t, rows):
    """``t [n, C]`` in front of ``rows [B, S, C]``."""
    return torch.cat([t.expand(rows.shape[0], -1, -1), rows], 1)


def _install_tokens(layer, tokens, tokens_pos, heads: int) -> None:
    """Replace ``layer``'s self-attention by the oracle attention with instruction tokens."""
    sa = layer.self_attn
    if hasattr(sa, "q_content_proj"):  # Conditional-DETR 5.x: projections on the module

        def forward(hidden_states, query_position_embeddings, attention_mask=None, **kw):
            h, pos = hidden_states, query_position_embeddings
            q = sa.q_content_proj(h) + sa.q_pos_proj(pos)
            k = _with_tokens(sa.k_content_proj(tokens) + sa.k_pos_proj(tokens_pos),
                             sa.k_content_proj(h) + sa.k_pos_proj(pos))  # fmt: skip
            v = _with_tokens(sa.v_proj(tokens), sa.v_proj(h))
            return _attend(q, k, v, heads, sa.o_proj), None

        sa.forward = forward
        return
    if hasattr(layer, "sa_kcontent_proj"):  # Conditional-DETR 4.57: projections on the layer
        core, kc, kp, vp = sa, layer.sa_kcontent_proj, layer.sa_kpos_proj, layer.sa_v_proj
        out = core.out_proj
    else:  # DAB-DETR: projections on the self-attention wrapper, around its core
        core, kc, kp = sa.self_attn, sa.self_attn_key_content_proj, sa.self_attn_key_pos_proj
        vp, out = sa.self_attn_value_proj, sa.self_attn.output_proj

    def core_forward(hidden_states, attention_mask=None, key_states=None, value_states=None,
                     output_attentions=None):  # fmt: skip
        k = _with_tokens(kc(tokens) + kp(tokens_pos), key_states)
        v = _with_tokens(vp(tokens), value_states)
        return _attend(hidden_states, k, v, heads, out), None

    core.forward = core_forward


def _decoder(model):
    return next(m for m in model.modules() if "mrdetr_routes" in m._modules)


def _oracle(plain, wrapped, route: str):
    """``plain`` (unwrapped copy) with ``route``'s own modules of ``wrapped`` in place."""
    oracle = copy.deepcopy(plain)
    state = _decoder(wrapped).mrdetr_routes
    integration = state.integration
    dec = next(m for m in oracle.modules() if type(m).__name__ == integration.decoder_class)
    heads = oracle.config.decoder_attention_heads
    for host, owned in zip(integration.layer_modules(dec), state.aux, strict=True):
        own = owned[route] if route in owned else None
        if own is None:
            continue
        if hasattr(own, "self_attn_norm"):
            host.self_attn_norm.load_state_dict(own.self_attn_norm.state_dict())
        if hasattr(own, "ffn"):
            for mine, theirs in zip(host.ffn, own.ffn, strict=True):
                mine.load_state_dict(theirs.state_dict())
        if hasattr(own, "tokens"):
            _install_tokens(host.layer, own.tokens.detach(), own.tokens_pos.detach(), heads)
    return oracle


def _perturb(model) -> None:
    """Move every route parameter off the host's values (copies would hide a mix-up)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in _decoder(model).mrdetr_routes.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _assert_same(pred, out, exact: bool) -> None:
    """``pred`` (mrdetr layout) against a detector output: last layer and every earlier one."""
    check = torch.equal if exact else lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert check(pred["pred_logits"], out.logits)
    assert check(pred["pred_boxes"], out.pred_boxes)
    theirs = out.auxiliary_outputs
    assert len(pred["aux_outputs"]) == len(theirs) > 0
    for mine, layer in zip(pred["aux_outputs"], theirs, strict=True):
        assert check(mine["pred_logits"], layer["logits"])
        assert check(mine["pred_boxes"], layer["pred_boxes"])


def _train_pass(family: str):
    model = tiny_model(family)
    if family == "dab_detr":  # box heads start at zero: make the anchors move
        heads = (model.bbox_predictor, model.model.decoder.bbox_embed)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in (p for h in heads for p in h.parameters()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    plain = copy.deepcopy(model)
    adapters.wrap(model, ROUTES, route_weights=dict.fromkeys(AUX, 0.0))
    _perturb(model)
    batch = tiny_batch(model)
    out = model(**batch)
    return model, plain, batch, out, adapters.route_outputs(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_primary_predictions_equal_the_models_own(family):
    model, plain, batch, out, outputs = _train_pass(family)
    preds = hf_route_predictions(model, outputs)
    _assert_same(preds["primary"], out, exact=True)
    want = plain(**batch)  # and the unwrapped model's outputs, every field
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(out, key), value), key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("route", AUX)
def test_route_equals_host_run_alone_with_its_modules(family, route):
    model, plain, batch, _, outputs = _train_pass(family)
    preds = hf_route_predictions(model, outputs)[route]
    with torch.no_grad():
        want = _oracle(plain, model, route)(**batch)
    _assert_same(preds, want, exact=False)
    # the route's own modules matter: the plain host disagrees
    other = plain(**batch)
    assert not torch.allclose(preds["pred_logits"], other.logits, atol=1e-3)


def _decoder_output(model, batch):
    """What ``model``'s (unwrapped) decoder returned in a training call on ``batch``."""
    dec = model.model.decoder
    seen = []
    hook = dec.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model(**batch)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_points_per_route(family):
    """Conditional-DETR: the same fixed 2-d points for every layer and route; DAB-DETR: the
    anchors each layer received, refined per route (the first layer's are the input's). The
    primary route's are the unwrapped decoder's."""
    model, plain, batch, _, outputs = _train_pass(family)
    refs = outputs.reference_points  # [N, R, B, Q, D]
    assert refs.shape[:2] == (model.config.decoder_layers, len(ROUTES))
    want = _decoder_output(plain, batch).reference_points
    if family == "conditional_detr":  # [Q, B, 2]
        assert refs.shape[-1] == 2
        assert torch.equal(refs, refs[:1, :1].expand_as(refs))
        assert torch.equal(refs[0, 0], want.transpose(0, 1))
    else:  # [N, B, Q, 4]
        assert refs.shape[-1] == 4
        assert torch.equal(refs[0], refs[0, :1].expand_as(refs[0]))  # same input anchors
        assert torch.equal(refs[:, 0], want)
        assert not torch.equal(refs[1, 0], refs[1, 1])  # refined by each route's own layer


def test_instruction_tokens_with_a_self_attention_mask_raise():
    """Neither decoder masks its self-attention; a mask would not cover the token columns."""
    lin = torch.nn.Linear(4, 4)
    q, tokens, mask = torch.zeros(1, 2, 4), torch.zeros(3, 4), torch.zeros(2, 2)
    calls = (ContentPositionCall(lin), ProjectedAttentionCall(lin, lin, lin, lin))
    for call in calls:
        with pytest.raises(ValueError, match="attn_mask=True"):
            call.attend_with_tokens(lin, q, q, q, tokens, tokens, mask, None)
