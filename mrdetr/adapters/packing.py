"""Routes packed along the query axis of a host decoder (the route mechanism).

In a training pass the wrapper tiles the decoder's queries ``[dn ; Q x R]`` along the query axis
(``dn`` leading denoising queries stay with the primary route) and calls the host's own forward.
Cross-attention, positional heads and everything else then run once over all ``R * Q``
queries, untouched. For the duration of that call only, the modules a route can own or that must
keep routes apart get a temporary ``forward`` (:func:`packed`):

- the self-attention folds the routes into the batch (``[R' * B, Q, C]``, block-diagonal per
  route: one host call for the routes sharing it); an instruction route attends through the
  host's weights (:func:`~mrdetr.layers.attention_weights.instructive_attention`) with its
  tokens; a route owning its self-attention calls its copy;
- the self-attention norm, the FFN (module or linears) run the host module over the sharing
  routes' slices and each owner's copy over its own slice.

Outside :func:`packed` the host modules are exactly as they were: ``eval()`` runs the original
code and nothing else.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers.attention_weights import attention_weights, instructive_attention
from ..layers.route_plan import Group
from .route_modules import RouteModules

__all__ = ["RouteLayout", "MHACall", "packed", "tile", "split"]


@dataclass(frozen=True)
class RouteLayout:
    """How the routes are laid out along the query axis: ``[dn ; Q (primary) ; Q ; ...]``.

    Attributes:
        num_routes: ``R``.
        num_queries: ``Q``, matching queries per route.
        num_denoising: ``dn``, leading denoising queries (primary route only).
        query_dim: query axis of the layers' hidden states (1 for ``[B, L, C]``, 0 for
            ``[L, B, C]``).
    """

    num_routes: int
    num_queries: int
    num_denoising: int = 0
    query_dim: int = 1

    @property
    def sizes(self) -> list[int]:
        """Length of every route's slice: ``[dn + Q, Q, ..., Q]``."""
        return [self.num_denoising + self.num_queries] + [self.num_queries] * (self.num_routes - 1)

    @property
    def length(self) -> int:
        """``dn + R * Q``."""
        return self.num_denoising + self.num_routes * self.num_queries


def tile(x: Tensor, layout: RouteLayout, dim: int) -> Tensor:
    """``x`` with ``dn + Q`` entries along ``dim`` -> ``[dn ; Q x R]`` (``dn + R * Q``)."""
    if x.shape[dim] != layout.num_denoising + layout.num_queries:
        raise ValueError(
            f"expected {layout.num_denoising + layout.num_queries} queries along dim {dim}, "
            f"got shape {tuple(x.shape)}"
        )
    match = x.narrow(dim, layout.num_denoising, layout.num_queries)
    return torch.cat([x, *[match] * (layout.num_routes - 1)], dim)


def split(x: Tensor, layout: RouteLayout, dim: int) -> list[Tensor]:
    """Inverse of :func:`tile` for outputs: one view per route (the primary's keeps ``dn``)."""
    return list(x.split(layout.sizes, dim))


def _gather(chunks: list[Tensor], idx: tuple[int, ...], dim: int) -> Tensor:
    return chunks[idx[0]] if len(idx) == 1 else torch.cat([chunks[i] for i in idx], dim)


def _slice(x: Tensor, layout: RouteLayout, group: Group, dim: int) -> Tensor:
    """The ``group``'s routes of packed ``x`` along ``dim``: a view when they are adjacent."""
    idx = group.routes
    if group.is_contiguous:
        start = sum(layout.sizes[: idx[0]])
        return x.narrow(dim, start, sum(layout.sizes[i] for i in idx))
    return _gather(split(x, layout, dim), idx, dim)


class _RoutedForward:
    """``forward`` of a module some routes own: host module on the sharing routes' slices, each
    owner's copy (``aux[layer][route].<slot>[index]``) on its own slice."""

    def __init__(self, state: RouteModules, layer: int, sublayer: str, slot: str, index, orig):
        self.state, self.layer, self.sublayer = state, layer, sublayer
        self.slot, self.index, self.orig = slot, index, orig

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        layout, plan = self.state.layout, self.state.plan
        dim, sizes = layout.query_dim, layout.sizes
        outs: list[Tensor | None] = [None] * layout.num_routes
        for g in plan.groups(self.sublayer, layout.num_routes):
            if g.owner is None:
                fn = self.orig
            else:
                fn = getattr(self.state.aux[self.layer][g.owner], self.slot)
                fn = fn if self.index is None else fn[self.index]
            y = fn(_slice(x, layout, g, dim), *args, **kwargs)
            parts = [y] if len(g.routes) == 1 else y.split([sizes[i] for i in g.routes], dim)
            for i, part in zip(g.routes, parts, strict=True):
                outs[i] = part
        return torch.cat(outs, dim)


class MHACall:
    """``nn.MultiheadAttention``'s call convention: ``(query, key, value, key_padding_mask=None,
    need_weights=True, attn_mask=None, ...) -> (out, weights)``, ``[B, L, C]`` with
    ``batch_first`` else ``[L, B, C]``. The packed pass returns ``(out, None)``."""

    _sig = inspect.signature(nn.MultiheadAttention.forward)

    def __init__(self, batch_first: bool) -> None:
        self.batch_first = batch_first

    def _bf(self, t: Tensor | None) -> Tensor | None:
        return t if t is None or self.batch_first else t.transpose(0, 1)

    def unpack(self, args, kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(q, k, v [B, L, C], attn_mask [L0, L0] or None, key_padding_mask [B, L] or None)``."""
        a = self._sig.bind(None, *args, **kwargs).arguments
        q, k, v = (self._bf(a[n]) for n in ("query", "key", "value"))
        if q.dim() != 3:
            raise ValueError(f"packed routes need batched [B, L, C] queries, got {tuple(q.shape)}")
        return q, k, v, a.get("attn_mask"), a.get("key_padding_mask")

    def call(self, fn, q, k, v, attn_mask, key_padding_mask) -> Tensor:
        """``fn`` (an ``nn.MultiheadAttention`` forward) on batch-first inputs; ``[B', L, C]``."""
        out = fn(self._bf(q), self._bf(k), self._bf(v), key_padding_mask=key_padding_mask,
                 need_weights=False, attn_mask=attn_mask)[0]  # fmt: skip
        return self._bf(out)

    def pack(self, out: Tensor):
        """Batch-first ``out`` -> the host's return value."""
        return self._bf(out), None


class _SelfAttentionForward:
    """``forward`` of a host self-attention in a packed pass (block-diagonal per route)."""

    def __init__(self, state: RouteModules, layer: int, module: nn.Module, call, orig) -> None:
        self.state, self.layer, self.module, self.call, self.orig = state, layer, module, call, orig

    def __call__(self, *args, **kwargs):
        layout, plan = self.state.layout, self.state.plan
        q, k, v, mask, kpm = self.call.unpack(args, kwargs)
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"packed routes support a [L, L] self-attention mask shared by the batch, got "
                f"{tuple(mask.shape)}"
            )
        dn = layout.num_denoising
        aux_mask = None if mask is None else mask[dn:, dn:]  # matching queries only
        qs, ks, vs = (split(t, layout, 1) for t in (q, k, v))
        kpms = [None] * layout.num_routes if kpm is None else split(kpm, layout, 1)
        outs: list[Tensor | None] = [None] * layout.num_routes
        for g in plan.groups("self_attn", layout.num_routes):
            if g.owner is None:  # primary alone when it carries denoising queries
                batches = [(0,), g.routes[1:]] if dn else [g.routes]
                for idx in filter(None, batches):
                    inputs = [_gather(t, idx, 0) for t in (qs, ks, vs)]  # [R'*B, L, C]
                    pad = None if kpm is None else _gather(kpms, idx, 0)
                    m = mask if idx[0] == 0 else aux_mask
                    y = self.call.call(self.orig, *inputs, m, pad)
                    for i, part in zip(idx, y.chunk(len(idx)), strict=True):
                        outs[i] = part
                continue
            i, own = g.routes[0], self.state.aux[self.layer][g.owner]
            attn = getattr(own, "self_attn", None)
            if hasattr(own, "tokens"):
                host = self.module if attn is None else attn
                w = attention_weights(host)
                outs[i] = instructive_attention(
                    qs[i], ks[i], vs[i], own.tokens + own.tokens_pos, own.tokens, w,
                    attn_mask=aux_mask, key_padding_mask=kpms[i],
                    dropout_p=w.dropout if host.training else 0.0,
                )  # fmt: skip
            else:
                outs[i] = self.call.call(attn, qs[i], ks[i], vs[i], aux_mask, kpms[i])
        return self.call.pack(torch.cat(outs, 1))


def _install(module: nn.Module, make, installed: list) -> None:
    if "forward" in module.__dict__:
        raise RuntimeError(
            f"{type(module).__name__} already has an instance forward (shared between layers, "
            "or wrapped twice): the route mechanism cannot pack it"
        )
    module.forward = make(module.forward)
    installed.append(module)


@contextlib.contextmanager
def packed(state: RouteModules, layout: RouteLayout, call_for) -> Iterator[list[list[Tensor]]]:
    """Route-aware forwards on the host's sub-modules for the duration of the block.

    Args:
        state: the wrapped decoder's :class:`~mrdetr.adapters.route_modules.RouteModules`.
        layout: the route layout of this pass.
        call_for: ``LayerModules -> call convention`` of the self-attention (e.g.
            :class:`MHACall`).

    Yields:
        ``hidden``: one list per layer, filled with that layer's output(s) as it runs.
    """
    installed: list[nn.Module] = []
    hooks, hidden = [], [[] for _ in state.host_layers]
    plan = state.plan
    try:
        for li, host in enumerate(state.host_layers):
            call = call_for(host)
            _install(host.self_attn, lambda o, h=host, c=call, li=li: _SelfAttentionForward(
                state, li, h.self_attn, c, o), installed)  # fmt: skip
            if plan.owners("self_attn_norm"):
                _install(host.self_attn_norm, lambda o, li=li: _RoutedForward(
                    state, li, "self_attn_norm", "self_attn_norm", None, o), installed)  # fmt: skip
            if plan.owners("ffn"):
                for j, m in enumerate(host.ffn):
                    _install(m, lambda o, li=li, j=j: _RoutedForward(
                        state, li, "ffn", "ffn", j, o), installed)  # fmt: skip
            hooks.append(host.layer.register_forward_hook(
                lambda _m, _i, out, li=li: hidden[li].append(out)))  # fmt: skip
        state.layout = layout
        yield hidden
    finally:
        state.layout = None
        for h in hooks:
            h.remove()
        for m in installed:
            del m.forward
