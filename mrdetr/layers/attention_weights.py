"""Instructive attention through any host self-attention's weights (fused or separate q/k/v).

:func:`attention_weights` reads the projections of a self-attention module someone else built:
``nn.MultiheadAttention`` (fused ``in_proj_weight`` or separate ``q/k/v_proj_weight``), our
:class:`~mrdetr.layers.MultiHeadSelfAttention`, or a module with ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` / ``o_proj`` linears (HF transformers' DETR family).
:func:`instructive_attention` runs multi-head attention of object queries with instruction tokens
in front of the keys through those weights; it is the adapter's counterpart of
:func:`~mrdetr.layers.instructive_self_attention` for hosts whose queries/keys and values are
given separately (``q = k = query + pos`` and ``v = query`` in DETR layers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .instructive_attention import _blocked_float, check_attn_mask

__all__ = ["AttentionWeights", "attention_weights", "instructive_attention"]


class AttentionWeights(NamedTuple):
    """Projections of a multi-head attention (``C`` channels, ``H`` heads).

    Attributes:
        q_weight, k_weight, v_weight (Tensor[C, C]), q_bias, k_bias, v_bias (Tensor[C] or None).
        out_weight (Tensor[C, C]), out_bias (Tensor[C] or None).
        num_heads: ``H``.
        dropout: dropout probability on the attention probabilities (training only).
        scale: logit scale, None for ``1 / sqrt(C / H)``.
    """

    q_weight: Tensor
    q_bias: Tensor | None
    k_weight: Tensor
    k_bias: Tensor | None
    v_weight: Tensor
    v_bias: Tensor | None
    out_weight: Tensor
    out_bias: Tensor | None
    num_heads: int
    dropout: float = 0.0
    scale: float | None = None


def _chunks(t: Tensor | None) -> tuple:
    return (None, None, None) if t is None else t.chunk(3)


def attention_weights(module: nn.Module) -> AttentionWeights:
    """The projections of ``module`` (see the module docstring for what is recognised).

    Raises:
        TypeError: ``module`` has none of the recognised layouts (names what was looked for).
        ValueError: an ``nn.MultiheadAttention`` with ``bias_k``/``bias_v`` or
            ``add_zero_attn``, whose extra key cannot be reproduced here.
    """
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(
                "module: nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is "
                "not supported by instruction tokens, got such a module"
            )
        if module.in_proj_weight is not None:
            wq, wk, wv = module.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        bq, bk, bv = _chunks(module.in_proj_bias)
        out = module.out_proj
        return AttentionWeights(
            wq, bq, wk, bk, wv, bv, out.weight, out.bias, module.num_heads, module.dropout
        )
    if hasattr(module, "in_proj_weight") and hasattr(module, "out_proj"):  # ours
        wq, wk, wv = module.in_proj_weight.chunk(3)
        bq, bk, bv = _chunks(getattr(module, "in_proj_bias", None))
        drop = float(getattr(module, "dropout", 0.0))
        out = module.out_proj
        return AttentionWeights(
            wq, bq, wk, bk, wv, bv, out.weight, out.bias, module.num_heads, drop
        )
    out = getattr(module, "out_proj", None) or getattr(module, "o_proj", None)
    names = ("q_proj", "k_proj", "v_proj")
    if out is not None and all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        heads = getattr(module, "num_heads", None) or getattr(
            getattr(module, "config", None), "num_attention_heads", None
        )
        if not isinstance(heads, int):
            raise TypeError(
                f"module {type(module).__name__}: found q/k/v projections but no int "
                "num_heads (or config.num_attention_heads)"
            )
        drop = getattr(module, "attention_dropout", getattr(module, "dropout", 0.0))
        drop = float(drop.p if isinstance(drop, nn.Dropout) else drop)
        q, k, v = (getattr(module, n) for n in names)
        scale = getattr(module, "scaling", None)
        return AttentionWeights(
            q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, out.weight, out.bias,
            heads, drop, None if scale is None else float(scale),
        )  # fmt: skip
    raise TypeError(
        f"module: expected a self-attention with in_proj_weight + out_proj "
        f"(nn.MultiheadAttention, mrdetr) or q_proj/k_proj/v_proj + out_proj/o_proj linears, "
        f"got {type(module).__name__}"
    )


def instructive_attention(
    q_input: Tensor,
    k_input: Tensor,
    v_input: Tensor,
    tokens_qk: Tensor | None,
    tokens_v: Tensor | None,
    weights: AttentionWeights,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Multi-head self-attention of object queries with instruction tokens in front of the keys.

    Keys are ``[tokens_qk ; k_input]`` (projected by ``k``), values ``[tokens_v ; v_input]``
    (projected by ``v``), queries ``q_input`` only (the instruction rows do not influence the
    object rows, so they are not computed). With ``tokens_qk=None`` this is the plain
    self-attention of the host module.

    Args:
        q_input, k_input (Tensor[B, Q, C]): inputs of the query and key projections (in DETR
            layers both are ``query + pos``).
        v_input (Tensor[B, Q, C]): input of the value projection.
        tokens_qk (Tensor[n, C] or None): instruction tokens' query/key input
            (``tokens + tokens_pos``); tokens_v (Tensor[n, C] or None): their value input.
        weights: the host's projections (:func:`attention_weights`).
        attn_mask (Tensor[Q, Q], bool or float, optional): among object queries; True blocks.
        key_padding_mask (Tensor[B, Q], bool or float, optional): True (or -inf) blocks that
            object key for every query; instruction keys are never padded.
        dropout_p: dropout on the attention probabilities.

    Returns:
        Tensor[B, Q, C].
    """
    w = weights
    b, q, c = q_input.shape
    for name, t in (("k_input", k_input), ("v_input", v_input)):
        if t.shape != q_input.shape:
            raise ValueError(
                f"{name} must match q_input {tuple(q_input.shape)}, got {tuple(t.shape)}"
            )
    n = 0 if tokens_qk is None else tokens_qk.shape[0]
    qp = F.linear(q_input, w.q_weight, w.q_bias)  # [B, Q, C]
    kp = F.linear(k_input, w.k_weight, w.k_bias)  # [B, Q, C]
    vp = F.linear(v_input, w.v_weight, w.v_bias)  # [B, Q, C]
    if n > 0:
        tk = F.linear(tokens_qk, w.k_weight, w.k_bias).expand(b, n, c)  # [B, n, C]
        tv = F.linear(tokens_v, w.v_weight, w.v_bias).expand(b, n, c)  # [B, n, C]
        kp, vp = torch.cat([tk, kp], 1), torch.cat([tv, vp], 1)  # [B, n+Q, C]
    mask = None
    check_attn_mask(attn_mask, q, q_input)
    if attn_mask is not None:
        mask = F.pad(_blocked_float(attn_mask, qp.dtype), (n, 0))  # [Q, n+Q]
    if key_padding_mask is not None:
        kd = key_padding_mask.dtype
        if kd != torch.bool and not key_padding_mask.is_floating_point():
            raise TypeError(f"key_padding_mask must be bool or floating, got {kd}")
        if tuple(key_padding_mask.shape) != (b, q):
            raise ValueError(
                f"key_padding_mask must be [B, Q]=({b}, {q}), got {tuple(key_padding_mask.shape)}"
            )
        kpm = F.pad(_blocked_float(key_padding_mask, qp.dtype), (n, 0))[:, None, None]
        mask = kpm if mask is None else mask + kpm  # [B, 1, Q or 1, n+Q]
    heads = "b s (h d) -> b h s d"
    qh, kh, vh = (rearrange(t, heads, h=w.num_heads) for t in (qp, kp, vp))
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, scale=w.scale
    )
    return F.linear(rearrange(out, "b h s d -> b s (h d)"), w.out_weight, w.out_bias)
