"""The one instructive attention: object queries attending to instruction tokens and each other.

:class:`AttentionWeights` is a view of any multi-head attention's projections: mrdetr's
:class:`~mrdetr.layers.MultiHeadSelfAttention` (fused ``in_proj_weight``), torch's
``nn.MultiheadAttention`` (fused or separate ``q/k/v_proj_weight``) or a module with ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` / ``o_proj`` linears (HF transformers' DETR family);
:func:`attention_weights` takes it. :func:`instructive_attend` runs the attention of Mr. DETR's
Route-3 through such a view, for our layer and for every host decoder alike.

Mask convention (as ``nn.MultiheadAttention``): a boolean ``attn_mask[i, j] = True`` blocks query
``i`` from key ``j``; a floating mask (any floating dtype, cast to the query's) is added to the
attention logits (``-inf`` blocks). Integer masks (``uint8``, ``int64``, ...) are rejected with a
``TypeError``: whether ``1`` means "block" or "add 1 to the logit" is ambiguous.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["AttentionWeights", "attention_weights", "check_attn_mask", "instructive_attend"]


class AttentionWeights(NamedTuple):
    """Projections of a multi-head attention (``C`` channels, ``H`` heads).

    Attributes:
        q_weight, k_weight (Tensor[C, C] or None), q_bias, k_bias (Tensor[C] or None): the query
            and key projections (None when only the fused ``qk_weight`` is given).
        v_weight (Tensor[C, C]), v_bias (Tensor[C] or None): the value projection.
        out_weight (Tensor[C, C]), out_bias (Tensor[C] or None): the output projection.
        num_heads: ``H``.
        dropout: dropout probability on the attention probabilities (training only).
        scale: logit scale, None for ``1 / sqrt(C / H)``.
        qk_weight (Tensor[2C, C] or None), qk_bias (Tensor[2C] or None): the query and key
            projections stacked, when the module stores them so; used for one projection when
            the query and key inputs are the same (``key=None`` in :func:`instructive_attend`).
    """

    q_weight: Tensor | None
    q_bias: Tensor | None
    k_weight: Tensor | None
    k_bias: Tensor | None
    v_weight: Tensor
    v_bias: Tensor | None
    out_weight: Tensor
    out_bias: Tensor | None
    num_heads: int
    dropout: float = 0.0
    scale: float | None = None
    qk_weight: Tensor | None = None
    qk_bias: Tensor | None = None


def _chunks(t: Tensor | None) -> tuple:
    return (None, None, None) if t is None else t.chunk(3)


def _query_key_value(module: nn.Module) -> bool:
    """Whether ``module`` keeps its projections as ``query``/``key``/``value``/``out_proj``
    linears with an int ``num_attention_heads`` (HF Grounding DINO, OmDet-Turbo)."""
    names = ("query", "key", "value", "out_proj")
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names) and isinstance(
        getattr(module, "num_attention_heads", None), int
    )


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
        head_dim = getattr(module, "head_dim", None)
        if getattr(module, "num_heads", None) is None and isinstance(head_dim, int) and head_dim:
            # HF 5.x modules keep head_dim, not num_heads; config.num_attention_heads is the
            # *encoder's* (DETR, Deformable-DETR), wrong for a decoder with another head count
            heads = module.q_proj.out_features // head_dim
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
    if _query_key_value(module):  # Grounding DINO, OmDet-Turbo: query/key/value + out_proj
        q, k, v, out = module.query, module.key, module.value, module.out_proj
        drop = getattr(module, "dropout", 0.0)
        drop = float(drop.p if isinstance(drop, nn.Dropout) else drop)
        return AttentionWeights(
            q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, out.weight, out.bias,
            module.num_attention_heads, drop,
        )  # fmt: skip
    raise TypeError(
        f"module: expected a self-attention with in_proj_weight + out_proj "
        f"(nn.MultiheadAttention, mrdetr) or q_proj/k_proj/v_proj + out_proj/o_proj linears, "
        f"got {type(module).__name__}"
    )


def check_attn_mask(
    attn_mask: Tensor | None, q: int, like: Tensor, name: str = "attn_mask"
) -> None:
    """Check an attention mask ``Tensor[Q, Q]`` against the ``Q`` queries of ``like`` (the query
    tensor): shape, dtype (bool or floating; integer masks raise ``TypeError``) and device."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{name} must be a Tensor[Q, Q] or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(
            f"{name} must be bool (True blocks) or floating (added to the logits), got "
            f"{attn_mask.dtype}; convert a 0/1 mask with mask.bool()"
        )
    if tuple(attn_mask.shape) != (q, q):
        raise ValueError(f"{name} must be [Q, Q]=({q}, {q}), got {tuple(attn_mask.shape)}")
    if attn_mask.device != like.device:
        raise ValueError(f"{name} is on {attn_mask.device}, the queries on {like.device}")


def _check(query, key, value, tokens, tokens_value, w, attn_mask, kpm, num_denoising) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [B, Q, C], got {tuple(query.shape)}")
    b, q, c = query.shape
    if c % w.num_heads != 0:
        raise ValueError(f"query channels must be divisible by num_heads={w.num_heads}, got C={c}")
    for name, t in (("key", key), ("value", value)):
        if t is not None and t.shape != query.shape:
            raise ValueError(f"{name} must match query {tuple(query.shape)}, got {tuple(t.shape)}")
    for name, t in (("tokens", tokens), ("tokens_value", tokens_value)):
        if t is not None and (t.dim() != 2 or t.shape[1] != c):
            raise ValueError(f"{name} must be [n, C={c}], got {tuple(t.shape)}")
    if (tokens is None) != (tokens_value is None) or (
        tokens is not None and tokens.shape != tokens_value.shape
    ):
        raise ValueError("tokens and tokens_value must both be [n, C] or both None")
    check_attn_mask(attn_mask, q, query)
    if kpm is not None:
        if kpm.dtype != torch.bool and not kpm.is_floating_point():
            raise TypeError(f"key_padding_mask must be bool or floating, got {kpm.dtype}")
        if tuple(kpm.shape) != (b, q):
            raise ValueError(f"key_padding_mask must be [B, Q]=({b}, {q}), got {tuple(kpm.shape)}")
    if not 0 <= num_denoising <= q:
        raise ValueError(f"num_denoising must be in [0, Q={q}], got {num_denoising}")


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive form of a mask (bool True -> -inf)."""
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return zeros.masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _object_rows_mask(attn_mask, kpm, n, q, num_denoising, dtype, device) -> Tensor | None:
    """Additive mask of the object-query rows over ``[tokens ; queries]`` keys: ``[Q, n+Q]``,
    ``[B, 1, Q, n+Q]`` or ``[B, 1, 1, n+Q]`` with a key padding mask; None if nothing blocks."""
    mask = None if attn_mask is None else _additive(attn_mask, dtype)  # [Q, Q]
    if n > 0 and num_denoising > 0:  # denoising queries never see the instructions
        left = torch.zeros(q, n, dtype=dtype, device=device)
        left[:num_denoising] = float("-inf")
        right = torch.zeros(q, q, dtype=dtype, device=device) if mask is None else mask
        mask = torch.cat([left, right], dim=1)
    elif n > 0 and mask is not None:
        mask = F.pad(mask, (n, 0))
    if kpm is not None:  # instruction keys are never padded
        pad = _additive(kpm, dtype)
        pad = (pad if n == 0 else F.pad(pad, (n, 0)))[:, None, None]  # [B, 1, 1, n+Q]
        mask = pad if mask is None else mask + pad
    return mask


def instructive_attend(
    query: Tensor,
    key: Tensor | None,
    value: Tensor,
    weights: AttentionWeights,
    tokens: Tensor | None = None,
    tokens_value: Tensor | None = None,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    num_denoising: int = 0,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Multi-head self-attention of object queries with instruction tokens in front of the keys.

    Keys are ``[tokens ; key]`` (projected by ``k``), values ``[tokens_value ; value]``
    (projected by ``v``), queries ``query`` only (the instruction rows do not influence the
    object rows, so they are not computed). Without tokens this is the plain self-attention of
    the module ``weights`` was taken from. In DETR layers ``query = key = content + position``
    and ``value = content``; ``tokens = tokens + tokens_pos`` and ``tokens_value = tokens``.

    Args:
        query (Tensor[B, Q, C]): input of the query projection.
        key (Tensor[B, Q, C] or None): input of the key projection; None: ``query`` (then a
            fused ``weights.qk_weight`` projects both in one matmul).
        value (Tensor[B, Q, C]): input of the value projection.
        weights: the projections (:func:`attention_weights`).
        tokens (Tensor[n, C] or None): instruction tokens' query/key input.
        tokens_value (Tensor[n, C] or None): their value input.
        attn_mask (Tensor[Q, Q], bool or float, optional): among object queries; True blocks.
        key_padding_mask (Tensor[B, Q], bool or float, optional): True (or -inf) blocks that
            object key for every query; instruction keys are never padded.
        num_denoising: leading denoising queries (DINO); they cannot see the instruction
            columns, the ``Q - num_denoising`` matching queries can.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
        need_weights: also return the attention probabilities, instruction rows included.

    Returns:
        (Tensor[B, Q, C], Tensor[B, H, n+Q, n+Q] or None): the object-query outputs and, when
        ``need_weights``, the attention probabilities (no dropout; without a key padding mask).
        In that map the instruction rows see the instructions and the matching queries.
    """
    w = weights
    _check(query, key, value, tokens, tokens_value, w, attn_mask, key_padding_mask, num_denoising)
    b, q, c = query.shape
    n = 0 if tokens is None else tokens.shape[0]
    fused = key is None and w.qk_weight is not None
    if fused:
        qp, kp = F.linear(query, w.qk_weight, w.qk_bias).chunk(2, dim=-1)  # [B, Q, C] each
    else:
        qp = F.linear(query, w.q_weight, w.q_bias)  # [B, Q, C]
        kp = F.linear(query if key is None else key, w.k_weight, w.k_bias)  # [B, Q, C]
    vp = F.linear(value, w.v_weight, w.v_bias)  # [B, Q, C]
    tok_q = None
    if n > 0:
        if fused:
            tok_q, tk = F.linear(tokens, w.qk_weight, w.qk_bias).chunk(2, dim=-1)  # [n, C]
        else:
            tk = F.linear(tokens, w.k_weight, w.k_bias)  # [n, C]
        tv = F.linear(tokens_value, w.v_weight, w.v_bias)  # [n, C]
        kp = torch.cat([tk.expand(b, n, c), kp], 1)  # [B, n+Q, C]
        vp = torch.cat([tv.expand(b, n, c), vp], 1)  # [B, n+Q, C]
    heads = "b s (h d) -> b h s d"
    qh, kh, vh = (rearrange(t, heads, h=w.num_heads) for t in (qp, kp, vp))
    mask = _object_rows_mask(attn_mask, key_padding_mask, n, q, num_denoising, qh.dtype, qh.device)
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, scale=w.scale
    )
    out = F.linear(rearrange(out, "b h s d -> b s (h d)"), w.out_weight, w.out_bias)
    if not need_weights:
        return out, None
    if key_padding_mask is not None:
        raise ValueError("need_weights: not supported with a key_padding_mask, got both")
    rows, full_mask = qh, mask
    if n > 0:
        if tok_q is None:
            tok_q = F.linear(tokens, w.q_weight, w.q_bias)
        rows = torch.cat([rearrange(tok_q.expand(b, n, c), heads, h=w.num_heads), qh], dim=2)
        tok_rows = torch.zeros(n, n + q, dtype=qh.dtype, device=qh.device)
        tok_rows[:, n : n + num_denoising] = float("-inf")
        obj_rows = mask if mask is not None else torch.zeros_like(tok_rows[:1]).expand(q, -1)
        full_mask = torch.cat([tok_rows, obj_rows], dim=0)  # [n+Q, n+Q]
    logits = rows @ kh.transpose(-1, -2)  # [B, H, n+Q, n+Q]
    logits = logits / math.sqrt(c // w.num_heads) if w.scale is None else logits * w.scale
    if full_mask is not None:
        logits = logits + full_mask
    return out, logits.softmax(-1)
