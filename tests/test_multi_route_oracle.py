"""Helpers for the multi-route tests: an unpacked, plainly written per-route oracle."""

import torch
import torch.nn.functional as F

from mrdetr import routes
from mrdetr.layers.multi_route import MultiRouteDecoderLayer

SHAPES = torch.tensor([[6, 8], [3, 4]])
STARTS = torch.tensor([0, 48])
S, C, HEADS, FFN_DIM, LEVELS, POINTS = 60, 32, 4, 48, 2, 2


def make_layer(routes, *, dropout=0.0, seed=0) -> MultiRouteDecoderLayer:
    """A small layer with every parameter (biases, norms, tokens) randomised."""
    torch.manual_seed(seed)
    layer = MultiRouteDecoderLayer(
        C, HEADS, FFN_DIM, LEVELS, POINTS, dropout, routes=routes, backend="pytorch"
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def make_inputs(num_routes, batch=2, queries=9, seed=1):
    """query, query_pos, reference_points [R, B, Q, L, 4] boxes, value."""
    g = torch.Generator().manual_seed(seed)
    r, b, q = num_routes, batch, queries
    query = torch.randn(r, b, q, C, generator=g)
    pos = torch.randn(r, b, q, C, generator=g)
    centre = 0.2 + 0.6 * torch.rand(r, b, q, LEVELS, 2, generator=g)
    size = 0.05 + 0.3 * torch.rand(r, b, q, LEVELS, 2, generator=g)
    ref = torch.cat([centre, size], -1)
    value = torch.randn(b, S, C, generator=g)
    return query, pos, ref, value


def run(layer, query, pos, ref, value, **kwargs):
    return layer(
        query, query_pos=pos, reference_points=ref, value=value,
        spatial_shapes=SHAPES, level_start_index=STARTS, **kwargs,
    )  # fmt: skip


def _self_attention(attn, query, pos, tokens=None, tokens_pos=None, mask=None, dn=0):
    """nn.MultiheadAttention math over [tokens; queries], instruction rows dropped."""
    b, q, c = query.shape
    n = 0 if tokens is None else tokens.shape[0]
    qk, v = query + pos, query
    if n:
        qk = torch.cat([(tokens + tokens_pos).expand(b, n, c), qk], 1)
        v = torch.cat([tokens.expand(b, n, c), v], 1)
    full = torch.zeros(n + q, n + q, dtype=torch.bool)
    full[n : n + dn, :n] = True
    if mask is not None:
        full[n:, n:] = mask
    out, _ = F.multi_head_attention_forward(
        qk.transpose(0, 1), qk.transpose(0, 1), v.transpose(0, 1), c, attn.num_heads,
        attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias, attn_mask=full, need_weights=False,
    )  # fmt: skip
    return out.transpose(0, 1)[:, n:]


def _norm(ln, x):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias)


def oracle_route(layer, index, query, pos, ref, value, mask=None, dn=0):
    """Route ``index`` of ``layer`` run alone: query/pos [B, Q, C], ref [B, Q, L, 4]."""
    route = layer.routes[index]
    aux = layer.aux[route.name] if index > 0 else None
    # self-attention: own weights, or the primary's; instruction tokens and own norm
    norm1, tokens, tokens_pos, attn = layer.norm1, None, None, layer.self_attn
    if route.num_instruction_tokens:
        tokens, tokens_pos, norm1 = aux.self_attn.tokens, aux.self_attn.tokens_pos, aux.norm1
        if route.own_self_attn:
            attn = aux.self_attn.attn
    elif route.own_self_attn:
        attn = aux.self_attn
    x = _norm(norm1, query + _self_attention(attn, query, pos, tokens, tokens_pos, mask, dn))
    cross = aux.cross_attn if route.own_cross_attn else layer.cross_attn
    x = _norm(layer.norm2, x + cross(x + pos, ref, value, SHAPES, STARTS))
    ffn = aux.ffn if route.own_ffn else layer.ffn
    hidden = F.relu(F.linear(x, ffn.linear1.weight, ffn.linear1.bias))
    return _norm(layer.norm3, x + F.linear(hidden, ffn.linear2.weight, ffn.linear2.bias))


def dino_mask(q, dn, group):
    """[Q, Q] bool (True = blocked): matching queries do not see denoising ones, groups isolated."""
    m = torch.zeros(q, q, dtype=torch.bool)
    m[dn:, :dn] = True
    for g in range(0, dn, group):
        m[g : g + group, :dn] = True
        m[g : g + group, g : g + group] = False
    return m


def test_oracle_self_attention_is_torch_multihead_attention():
    """The oracle's attention without tokens is nn.MultiheadAttention (checks the helper)."""
    layer = make_layer(routes.baseline())
    mha = torch.nn.MultiheadAttention(C, HEADS, batch_first=True)
    mha.load_state_dict(layer.self_attn.state_dict())
    query, pos, _, _ = make_inputs(1)
    mask = dino_mask(query.shape[2], 4, 2)
    expected = mha(query[0] + pos[0], query[0] + pos[0], query[0], attn_mask=mask)[0]
    got = _self_attention(layer.self_attn, query[0], pos[0], mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
