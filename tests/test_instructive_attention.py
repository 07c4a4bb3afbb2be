"""Instructive self-attention against torch's own attention over the full concatenated sequence."""

import math

import pytest
import torch
import torch.nn.functional as F

from mrdetr.layers.instructive_attention import InstructiveSelfAttention, MultiHeadSelfAttention
from mrdetr.routing import AttentionWeights, instructive_attend

B, Q, C, H, N = 2, 7, 16, 4, 3


def oracle(attn: MultiHeadSelfAttention, query, pos, tokens, tokens_pos, dn=0, qmask=None):
    """Attention over all n+Q rows with F.multi_head_attention_forward, instruction rows dropped.

    Returns (object-query outputs [B, Q, C], full map [B, H, n+Q, n+Q]).
    """
    b, q, c = query.shape
    n = tokens.shape[0]
    qk = torch.cat([(tokens + tokens_pos).expand(b, n, c), query + pos], 1)
    v = torch.cat([tokens.expand(b, n, c), query], 1)
    full = torch.zeros(n + q, n + q, dtype=torch.bool)
    full[n : n + dn, :n] = True  # denoising rows do not see instruction columns
    full[:n, n : n + dn] = True  # instruction rows do not see denoising columns (map only)
    if qmask is not None:
        full[n:, n:] = qmask
    out, weights = F.multi_head_attention_forward(
        qk.transpose(0, 1), qk.transpose(0, 1), v.transpose(0, 1), c, attn.num_heads,
        attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias, attn_mask=full, need_weights=True,
        average_attn_weights=False,
    )  # fmt: skip
    return out.transpose(0, 1)[:, n:], weights


def dino_mask(q: int, dn: int, group: int) -> torch.Tensor:
    """DINO-like [Q, Q] mask: matching queries do not see denoising ones; groups are isolated."""
    m = torch.zeros(q, q, dtype=torch.bool)
    m[dn:, :dn] = True
    for g in range(0, dn, group):
        m[g : g + group, :dn] = True
        m[g : g + group, g : g + group] = False
    return m


@pytest.fixture
def data():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(C, H)
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    return attn, torch.randn(B, Q, C), torch.randn(B, Q, C), torch.randn(N, C), torch.randn(N, C)


def test_matches_full_sequence_oracle(data):
    attn, query, pos, tok, tok_pos = data
    out, weights = attn.attend(query, pos, tok, tok_pos, need_weights=True)
    ref_out, ref_w = oracle(attn, query, pos, tok, tok_pos)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("float_mask", [False, True])
def test_dino_mask_matches_oracle(data, float_mask):
    attn, query, pos, tok, tok_pos = data
    dn, m = 4, dino_mask(Q, 4, 2)
    given = m if not float_mask else torch.zeros(Q, Q).masked_fill(m, float("-inf"))
    out, weights = attn.attend(
        query, pos, tok, tok_pos, attn_mask=given, num_denoising=dn, need_weights=True
    )
    ref_out, ref_w = oracle(attn, query, pos, tok, tok_pos, dn=dn, qmask=m)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_w, atol=1e-5, rtol=1e-5)
    assert torch.all(weights[:, :, N : N + dn, :N] == 0)  # denoising rows ignore instructions
    assert torch.all(weights[:, :, N + dn :, :N].sum(-1) > 0)  # matching rows use them


def test_instructions_reach_matching_queries_only(data):
    attn, query, pos, tok, tok_pos = data
    dn, m = 4, dino_mask(Q, 4, 2)
    a = attn.attend(query, pos, tok, tok_pos, attn_mask=m, num_denoising=dn)[0]
    b = attn.attend(query, pos, tok + 1.0, tok_pos - 1.0, attn_mask=m, num_denoising=dn)[0]
    torch.testing.assert_close(a[:, :dn], b[:, :dn], atol=0, rtol=0)
    assert (a[:, dn:] - b[:, dn:]).abs().min() > 1e-4


def test_without_tokens_is_multihead_attention(data):
    attn, query, pos, _, _ = data
    mha = torch.nn.MultiheadAttention(C, H, batch_first=True)
    mha.load_state_dict(attn.state_dict())
    m = dino_mask(Q, 4, 2)
    expected = mha(query + pos, query + pos, query, attn_mask=m, need_weights=False)[0]
    torch.testing.assert_close(attn(query, pos, attn_mask=m), expected, atol=1e-5, rtol=1e-5)


def test_hand_computed_single_query():
    """C=2, one head, identity projections: out = softmax([t.q, q.q]/sqrt 2) @ [t; q]."""
    eye = torch.eye(2)
    query, token = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[0.0, 1.0]])
    weights = AttentionWeights(eye, None, eye, None, eye, None, eye, None, num_heads=1)
    out, w = instructive_attend(query, None, query, weights, token, token, need_weights=True)
    e0, e1 = math.exp(0.0), math.exp(1.0 / math.sqrt(2.0))
    w_tok, w_q = e0 / (e0 + e1), e1 / (e0 + e1)
    torch.testing.assert_close(out, torch.tensor([[[w_q, w_tok]]]))
    torch.testing.assert_close(w[0, 0, 1], torch.tensor([w_tok, w_q]))


def test_module_parameters_and_gradients():
    torch.manual_seed(0)
    m = InstructiveSelfAttention(C, H, num_tokens=N)
    assert m.tokens.shape == (N, C) and m.tokens_pos.shape == (N, C)
    out, weights = m(torch.randn(B, Q, C), torch.randn(B, Q, C), need_weights=True)
    assert out.shape == (B, Q, C) and weights.shape == (B, H, N + Q, N + Q)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, N + Q))
    out.square().sum().backward()
    assert m.tokens.grad.abs().sum() > 0 and m.tokens_pos.grad.abs().sum() > 0


def test_shared_projections(data):
    attn, query, pos, _, _ = data
    m = InstructiveSelfAttention(C, H, num_tokens=N, own_projections=False)
    assert m.attn is None and {n for n, _ in m.named_parameters()} == {"tokens", "tokens_pos"}
    ref_out, _ = oracle(attn, query, pos, m.tokens.detach(), m.tokens_pos.detach())
    torch.testing.assert_close(m(query, pos, projections=attn), ref_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="projections"):
        m(query, pos)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attn_mask=torch.zeros(Q, Q + 1, dtype=torch.bool)), "attn_mask"),
        (dict(num_denoising=Q + 1), "num_denoising"),
        (dict(tokens=torch.zeros(N, C + 1)), "tokens"),
        (dict(query_pos=torch.zeros(B, Q + 1, C)), "query_pos"),
        (dict(query=torch.zeros(Q, C)), "query"),
    ],
)
def test_bad_inputs_raise(data, kwargs, match):
    attn, query, pos, tok, tok_pos = data
    args = dict(query=query, query_pos=pos, tokens=tok, tokens_pos=tok_pos)
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("attn_mask", "num_denoising") if k in args}
    with pytest.raises(ValueError, match=match):
        attn.attend(args["query"], args["query_pos"], args["tokens"], args["tokens_pos"], **extra)
