"""``MoEFFN``: a route-aware mixture-of-experts FFN for an auxiliary route (Mr. DETR++ style).

``E`` expert FFNs (each Deformable-DETR's FFN) and a linear router. Every query (token) ``x`` is
routed on ``x + e`` (``e``: the route's learned embedding) to its ``k`` most probable experts
and their outputs are mixed with the router probabilities::

    p = softmax(router(x + e))                      # [T, E]
    y = sum_{j in top_k(p)} p_j * expert_j(x)        # [T, C]

No renormalisation of the top-k probabilities (Switch Transformer's choice: with ``k = 1`` the
router still gets a gradient from the task loss). No capacity limit: every query is processed by
all of its ``k`` experts, none is dropped (at DETR scale, a few thousand queries per batch, the
uneven expert loads cost less than dropping queries would). The load-balancing loss is Switch
Transformer's ``E * sum_e f_e * P_e`` (``f_e``: fraction of the ``T * k`` assignments that go to
expert ``e``; ``P_e``: mean router probability of ``e``). It equals 1 when the router
probabilities are uniform; for confident routing (``P = f``) it is ``E * sum_e f_e^2``, minimal
(1) exactly when the load is uniform, and it grows to ``E`` as the router collapses onto one
expert. (For soft probabilities on a finite batch it can dip slightly below 1: it is a
balancing pressure, not a bound.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ffn import FFN

__all__ = ["MoEFFN", "load_balancing_loss", "moe_ffn"]


def load_balancing_loss(probs: Tensor, top_idx: Tensor) -> Tensor:
    """Switch Transformer's load-balancing loss ``E * sum_e f_e * P_e``.

    Args:
        probs (Tensor[T, E]): router probabilities.
        top_idx (Tensor[T, k], int64): the experts each token was sent to.

    Returns:
        Tensor[] (1 for uniform probabilities or a uniform confident load; 0 for ``T = 0``).
    """
    t, e = probs.shape
    if t == 0:
        return probs.sum()
    counts = torch.zeros(e, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, top_idx.reshape(-1), torch.ones_like(top_idx, dtype=probs.dtype).view(-1))
    frac = counts / top_idx.numel()  # f_e, no gradient (argmax)
    return e * (frac * probs.mean(0)).sum()


def moe_ffn(
    x: Tensor, logits: Tensor, experts: nn.ModuleList, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Dropless top-k mixture of experts (the functional core of :class:`MoEFFN`).

    Args:
        x (Tensor[T, C]): tokens.
        logits (Tensor[T, E]): router logits.
        experts: ``E`` modules ``Tensor[n, C] -> Tensor[n, C]``.
        top_k: experts per token.

    Returns:
        ``(y (Tensor[T, C]), probs (Tensor[T, E]), top_idx (Tensor[T, k]))``.
    """
    probs = logits.float().softmax(-1).to(x.dtype)  # [T, E]
    top_p, top_idx = probs.topk(top_k, dim=-1)  # [T, k]; ties: lower expert index first
    y = torch.zeros_like(x)
    flat_idx = top_idx.reshape(-1)  # [T*k]
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_k)  # [T*k]
    gate = top_p.reshape(-1)  # [T*k]
    for e, expert in enumerate(experts):
        sel = (flat_idx == e).nonzero()[:, 0]
        if sel.numel() == 0:
            continue
        rows = token[sel]
        y.index_add_(0, rows, expert(x[rows]) * gate[sel, None])
    return y, probs, top_idx


class MoEFFN(nn.Module):
    """Mixture of ``num_experts`` FFNs with top-``top_k`` routing and a route embedding.

    Args:
        embed_dim: ``C``.
        ffn_dim, dropout, activation: of every expert (:class:`~mrdetr.layers.ffn.FFN`).
        num_experts: ``E >= 2``.
        top_k: experts per query, ``1 <= k <= E``.

    ``forward(x (Tensor[..., C])) -> Tensor[..., C]``: a drop-in for :class:`FFN` (the
    load-balancing loss is dropped). :meth:`forward_with_balance_loss` also returns that loss;
    the decoder returns it per route in ``MultiRouteDecoderOutput.balance_losses``. Nothing of a
    forward is stored on the module.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        ffn_dim: int = 1024,
        num_experts: int = 4,
        top_k: int = 1,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(f"MoEFFN: num_experts must be an int >= 2, received {num_experts!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEFFN: top_k must be an int in [1, {num_experts}], got {top_k!r}")
        self.num_experts, self.top_k = num_experts, top_k
        self.route_embedding = nn.Parameter(torch.empty(embed_dim))
        self.router = nn.Linear(embed_dim, num_experts)
        self.experts = nn.ModuleList(
            FFN(embed_dim, ffn_dim, dropout, activation) for _ in range(num_experts)
        )
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"

    def reset_parameters(self) -> None:
        """Experts: FFN's default; router and route embedding ~ N(0, 0.02), router bias 0 (a
        nearly uniform router whose argmax still differs between queries)."""
        for expert in self.experts:
            expert.reset_parameters()
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        nn.init.normal_(self.route_embedding, std=0.02)

    def router_logits(self, x: Tensor) -> Tensor:
        """Router logits ``Tensor[..., E]`` of ``x (Tensor[..., C])`` (sees the route embedding)."""
        return F.linear(x + self.route_embedding, self.router.weight, self.router.bias)

    def forward_with_balance_loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (Tensor[..., C])`` -> ``(Tensor[..., C], balance loss Tensor[])``
        (:func:`load_balancing_loss` of this call's routing)."""
        flat = x.reshape(-1, x.shape[-1])  # [T, C]
        y, probs, top_idx = moe_ffn(flat, self.router_logits(flat), self.experts, self.top_k)
        return y.view(x.shape), load_balancing_loss(probs, top_idx)

    def forward(self, x: Tensor) -> Tensor:
        """``x (Tensor[..., C])`` -> ``Tensor[..., C]`` (the balance loss is not kept)."""
        return self.forward_with_balance_loss(x)[0]
