"""Self-attention with optional learnable instruction tokens (Mr. DETR's instructive attention).

Functional core :func:`instructive_self_attention`; thin modules :class:`MultiHeadSelfAttention`
(the plain layer, parameter names of ``nn.MultiheadAttention``) and
:class:`InstructiveSelfAttention` (instruction tokens, attending through its own or a given
:class:`MultiHeadSelfAttention`'s weights).

Mask convention (as ``nn.MultiheadAttention``): a boolean ``attn_mask[i, j] = True`` blocks query
``i`` from key ``j``; a floating mask (any floating dtype, cast to the query's) is added to the
attention logits (``-inf`` blocks). Integer masks (``uint8``, ``int64``, ...) are rejected with a
``TypeError``: whether ``1`` means "block" or "add 1 to the logit" is ambiguous, and adding it
silently is what a 0/1 mask would do otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "check_attn_mask",
    "instructive_self_attention",
    "MultiHeadSelfAttention",
    "InstructiveSelfAttention",
]


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


def _check(query, query_pos, tokens, tokens_pos, num_heads, attn_mask, num_denoising) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [B, Q, C], got {tuple(query.shape)}")
    _, q, c = query.shape
    if c % num_heads != 0:
        raise ValueError(f"query channels must be divisible by num_heads={num_heads}, got C={c}")
    if query_pos is not None and query_pos.shape != query.shape:
        raise ValueError(
            f"query_pos must match query {tuple(query.shape)}, got {tuple(query_pos.shape)}"
        )
    if tokens is not None:
        if tokens.dim() != 2 or tokens.shape[1] != c:
            raise ValueError(f"tokens must be [n, C={c}], got {tuple(tokens.shape)}")
        if tokens_pos is not None and tokens_pos.shape != tokens.shape:
            raise ValueError(
                f"tokens_pos must match tokens {tuple(tokens.shape)}, got {tuple(tokens_pos.shape)}"
            )
    check_attn_mask(attn_mask, q, query)
    if not 0 <= num_denoising <= q:
        raise ValueError(f"num_denoising must be in [0, Q={q}], got {num_denoising}")


def _blocked_float(attn_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive form of a mask (bool True -> -inf)."""
    if attn_mask.dtype == torch.bool:
        zeros = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        return zeros.masked_fill(attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def _object_rows_mask(
    attn_mask: Tensor | None, n: int, q: int, num_denoising: int, dtype: torch.dtype, device
) -> Tensor | None:
    """Additive mask ``[Q, n+Q]`` of the object-query rows; None when nothing is blocked."""
    if n == 0 or num_denoising == 0:
        if attn_mask is None:
            return None
        if n == 0:
            return _blocked_float(attn_mask, dtype)
    left = torch.zeros(q, n, dtype=dtype, device=device)
    left[:num_denoising] = float("-inf")  # denoising queries never see the instructions
    right = (
        torch.zeros(q, q, dtype=dtype, device=device)
        if attn_mask is None
        else _blocked_float(attn_mask, dtype)
    )
    return torch.cat([left, right], dim=1)  # [Q, n+Q]


def instructive_self_attention(
    query: Tensor,
    query_pos: Tensor | None,
    tokens: Tensor | None,
    tokens_pos: Tensor | None,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    *,
    num_heads: int,
    attn_mask: Tensor | None = None,
    num_denoising: int = 0,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Multi-head self-attention of object queries, optionally with instruction tokens in front.

    Queries and keys are ``[tokens + tokens_pos ; query + query_pos]``, values are
    ``[tokens ; query]``. Only the object-query rows are computed (the instruction rows would be
    dropped anyway and do not influence them). With ``tokens=None`` this is plain self-attention
    (``nn.MultiheadAttention`` with ``q = k = query + query_pos``, ``v = query``).

    Args:
        query (Tensor[B, Q, C]): object queries (content).
        query_pos (Tensor[B, Q, C] or None): their positional embedding.
        tokens (Tensor[n, C] or None): instruction content embeddings, shared by the batch.
        tokens_pos (Tensor[n, C] or None): instruction positional embeddings.
        in_proj_weight (Tensor[3C, C]), in_proj_bias (Tensor[3C] or None): packed q, k, v
            projections (``nn.MultiheadAttention`` layout).
        out_proj_weight (Tensor[C, C]), out_proj_bias (Tensor[C] or None): output projection.
        num_heads: attention heads ``H``.
        attn_mask (Tensor[Q, Q], bool or float, optional): among object queries; bool True
            blocks, float is added to the logits; integer dtypes raise ``TypeError``.
        num_denoising: leading denoising queries (DINO); they cannot see the instruction
            columns, the ``Q - num_denoising`` matching queries can.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
        need_weights: also return the full attention map, instruction rows included.

    Returns:
        (Tensor[B, Q, C], Tensor[B, H, n+Q, n+Q] or None): the object-query outputs and, when
        ``need_weights``, the attention probabilities (no dropout). In that map the instruction
        rows see the instructions and the matching queries, not the denoising queries.
    """
    _check(query, query_pos, tokens, tokens_pos, num_heads, attn_mask, num_denoising)
    b, q, c = query.shape
    n = 0 if tokens is None else tokens.shape[0]
    qk_in = query if query_pos is None else query + query_pos
    w_qk, w_v = in_proj_weight[: 2 * c], in_proj_weight[2 * c :]
    b_qk = None if in_proj_bias is None else in_proj_bias[: 2 * c]
    b_v = None if in_proj_bias is None else in_proj_bias[2 * c :]
    q_proj, k_proj = F.linear(qk_in, w_qk, b_qk).chunk(2, dim=-1)  # [B, Q, C] each
    v_proj = F.linear(query, w_v, b_v)  # [B, Q, C]
    if n > 0:
        tok_qk_in = tokens if tokens_pos is None else tokens + tokens_pos
        tok_q, tok_k = F.linear(tok_qk_in, w_qk, b_qk).chunk(2, dim=-1)  # [n, C] each
        tok_v = F.linear(tokens, w_v, b_v)  # [n, C]
        k_proj = torch.cat([tok_k.expand(b, n, c), k_proj], dim=1)  # [B, n+Q, C]
        v_proj = torch.cat([tok_v.expand(b, n, c), v_proj], dim=1)  # [B, n+Q, C]
    heads = "b s (h d) -> b h s d"
    qh = rearrange(q_proj, heads, h=num_heads)
    kh = rearrange(k_proj, heads, h=num_heads)
    vh = rearrange(v_proj, heads, h=num_heads)
    mask = _object_rows_mask(attn_mask, n, q, num_denoising, qh.dtype, qh.device)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p)
    out = F.linear(rearrange(out, "b h s d -> b s (h d)"), out_proj_weight, out_proj_bias)
    if not need_weights:
        return out, None
    rows = qh
    full_mask = mask
    if n > 0:
        rows = torch.cat([rearrange(tok_q.expand(b, n, c), heads, h=num_heads), qh], dim=2)
        tok_rows = torch.zeros(n, n + q, dtype=qh.dtype, device=qh.device)
        tok_rows[:, n : n + num_denoising] = float("-inf")
        obj_rows = mask if mask is not None else torch.zeros_like(tok_rows[:1]).expand(q, -1)
        full_mask = torch.cat([tok_rows, obj_rows], dim=0)  # [n+Q, n+Q]
    logits = rows @ kh.transpose(-1, -2) / math.sqrt(c // num_heads)  # [B, H, n+Q, n+Q]
    if full_mask is not None:
        logits = logits + full_mask
    return out, logits.softmax(-1)


class MultiHeadSelfAttention(nn.Module):
    """Plain multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    ``in_proj_weight [3C, C]``, ``in_proj_bias [3C]``, ``out_proj`` (``nn.Linear``); initialised
    like ``nn.MultiheadAttention``. No residual or normalisation inside.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}"
            )
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform in-projection, default ``nn.Linear`` out-projection, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        self.out_proj.reset_parameters()
        nn.init.zeros_(self.out_proj.bias)

    def attend(
        self,
        query: Tensor,
        query_pos: Tensor | None,
        tokens: Tensor | None = None,
        tokens_pos: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        num_denoising: int = 0,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """:func:`instructive_self_attention` with this module's weights (same shapes)."""
        return instructive_self_attention(
            query,
            query_pos,
            tokens,
            tokens_pos,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
            num_heads=self.num_heads,
            attn_mask=attn_mask,
            num_denoising=num_denoising,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
        )

    def forward(
        self, query: Tensor, query_pos: Tensor | None = None, *, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Self-attention of ``query (Tensor[B, Q, C])`` with ``attn_mask [Q, Q]``; [B, Q, C]."""
        return self.attend(query, query_pos, attn_mask=attn_mask)[0]


class InstructiveSelfAttention(nn.Module):
    """Self-attention with ``num_tokens`` learnable instruction tokens (Mr. DETR, Route-3).

    Parameters: ``tokens [n, C]`` (content) and ``tokens_pos [n, C]`` (positional), initialised
    N(0, 1) like the reference's ``nn.Embedding``; and, when ``own_projections`` is True, an own
    :class:`MultiHeadSelfAttention` ``attn``. With ``own_projections=False`` the weights are given
    at call time (Mr. DETR: the primary route's self-attention).

    Args:
        embed_dim: channels ``C``.
        num_heads: attention heads.
        num_tokens: instruction tokens ``n`` (the reference uses 10).
        dropout: dropout on the attention probabilities (own projections only; given
            projections use their own setting).
        own_projections: create own attention weights.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_tokens: int = 10,
        dropout: float = 0.0,
        *,
        own_projections: bool = True,
    ) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.embed_dim, self.num_heads, self.num_tokens = embed_dim, num_heads, num_tokens
        self.tokens = nn.Parameter(torch.empty(num_tokens, embed_dim))
        self.tokens_pos = nn.Parameter(torch.empty(num_tokens, embed_dim))
        self.attn = (
            MultiHeadSelfAttention(embed_dim, num_heads, dropout) if own_projections else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Instruction tokens ~ N(0, 1); own projections re-initialised."""
        nn.init.normal_(self.tokens)
        nn.init.normal_(self.tokens_pos)
        if self.attn is not None:
            self.attn.reset_parameters()

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        num_denoising: int = 0,
        need_weights: bool = False,
        projections: MultiHeadSelfAttention | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Instructive self-attention of the object queries.

        Args:
            query (Tensor[B, Q, C]), query_pos (Tensor[B, Q, C] or None).
            attn_mask (Tensor[Q, Q], optional): bool True blocks / float added (see module doc).
            num_denoising: leading denoising queries, which cannot see the instruction tokens.
            need_weights: also return the attention map.
            projections: attention weights to use; required when ``own_projections=False``.

        Returns:
            Tensor[B, Q, C], or (Tensor[B, Q, C], Tensor[B, H, n+Q, n+Q]) with ``need_weights``
            (instruction tokens first, as in the paper's figure).
        """
        attn = projections if projections is not None else self.attn
        if attn is None:
            raise ValueError(
                "projections must be given: this InstructiveSelfAttention was built with "
                "own_projections=False, got projections=None"
            )
        out, weights = attn.attend(
            query,
            query_pos,
            self.tokens,
            self.tokens_pos,
            attn_mask=attn_mask,
            num_denoising=num_denoising,
            need_weights=need_weights,
        )
        return (out, weights) if need_weights else out
