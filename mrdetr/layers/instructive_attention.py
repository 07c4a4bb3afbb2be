"""Self-attention modules with optional learnable instruction tokens (Mr. DETR's Route-3).

:class:`MultiHeadSelfAttention` (the plain layer, parameter names of ``nn.MultiheadAttention``)
and :class:`InstructiveSelfAttention` (instruction tokens, attending through its own or a given
:class:`MultiHeadSelfAttention`'s weights). Both compute with the one instructive attention,
:func:`mrdetr.routing.instructive_attend` (its module docstring has the mask convention: bool
True blocks, floating is added to the logits, integer masks raise ``TypeError``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..routing.attention import AttentionWeights, instructive_attend

__all__ = ["MultiHeadSelfAttention", "InstructiveSelfAttention"]


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
        """Self-attention of ``query`` (+ ``query_pos``) with instruction tokens in front.

        Queries and keys are ``[tokens + tokens_pos ; query + query_pos]``, values
        ``[tokens ; query]``: :func:`~mrdetr.routing.instructive_attend` with this module's
        weights (q and k in one projection).

        Args:
            query (Tensor[B, Q, C]), query_pos (Tensor[B, Q, C] or None).
            tokens, tokens_pos (Tensor[n, C] or None): instruction tokens (content, position).
            attn_mask (Tensor[Q, Q], optional): bool True blocks / float added.
            num_denoising: leading denoising queries, which cannot see the instruction tokens.
            need_weights: also return the attention map ``[B, H, n+Q, n+Q]``.

        Returns:
            (Tensor[B, Q, C], Tensor[B, H, n+Q, n+Q] or None).
        """
        if query_pos is not None and query_pos.shape != query.shape:
            raise ValueError(
                f"query_pos must match query {tuple(query.shape)}, got {tuple(query_pos.shape)}"
            )
        if tokens is not None and tokens_pos is not None and tokens_pos.shape != tokens.shape:
            raise ValueError(
                f"tokens_pos must match tokens {tuple(tokens.shape)}, got {tuple(tokens_pos.shape)}"
            )
        c = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        weights = AttentionWeights(
            None, None, None, None, w[2 * c :], None if b is None else b[2 * c :],
            self.out_proj.weight, self.out_proj.bias, self.num_heads, self.dropout,
            qk_weight=w[: 2 * c], qk_bias=None if b is None else b[: 2 * c],
        )  # fmt: skip
        qk = query if query_pos is None else query + query_pos
        tok_qk = tokens if tokens is None or tokens_pos is None else tokens + tokens_pos
        return instructive_attend(
            qk, None, query, weights, tok_qk, tokens,
            attn_mask=attn_mask, num_denoising=num_denoising,
            dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights,
        )  # fmt: skip

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

    def copy_primary(self, primary: MultiHeadSelfAttention) -> None:
        """Own projections (if any) from the primary route's ``primary``; tokens unchanged."""
        if self.attn is not None:
            self.attn.load_state_dict(primary.state_dict())

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
