"""Routes packed along the query axis of a host decoder (the route mechanism).

In a training pass the wrapper tiles the decoder's queries ``[dn ; Q x R]`` along the query axis
(``dn`` leading denoising queries stay with the primary route) and calls the host's own forward.
Cross-attention, positional heads and everything else then run once over all ``R * Q``
queries, untouched. For the duration of that call only, the modules a route can own or that must
keep routes apart get a temporary ``forward`` (:func:`packed`):

- the self-attention folds the routes into the batch (``[R' * B, Q, C]``, block-diagonal per
  route: one host call for the routes sharing it); an instruction route attends through the
  host's weights (:func:`~mrdetr.routing.instructive_attend`) with its tokens; a route owning
  its self-attention calls its copy;
- the self-attention norm, the FFN (module or linears) run the host module over the sharing
  routes' pack and each owner's copy over its own slice (:func:`~mrdetr.routing.dispatch`).

The temporary forwards read the :class:`~mrdetr.adapters.integration.RoutePass` of the call
that installed them, never state kept on a shared object.

Outside :func:`packed` the host modules are exactly as they were: ``eval()`` runs the original
code and nothing else.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..routing import attention_weights, dispatch, gather, instructive_attend, split
from .route_modules import RouteModules

__all__ = ["MHACall", "packed"]


class _RoutedForward:
    """``forward`` of a module some routes own: host module on the sharing routes' slices, each
    owner's copy (``aux[layer][route].<sublayer>[index]``) on its own slice."""

    def __init__(self, state, rp, layer: int, sublayer: str, index, orig) -> None:
        self.state, self.rp, self.layer, self.sublayer = state, rp, layer, sublayer
        self.index, self.orig = index, orig

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        def run(pack, xs):
            if pack.owner is None:
                return self.orig(xs, *args, **kwargs)
            fn = getattr(self.state.aux[self.layer][pack.owner], self.sublayer)
            return (fn if self.index is None else fn[self.index])(xs, *args, **kwargs)

        layout = self.rp.layout
        return dispatch(layout, self.state.plan.packs(self.sublayer, layout.num_routes), run, x)


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
    """``forward`` of a host self-attention in a packed pass (block-diagonal per route).

    The instruction route attends through the host's q/k/v weights
    (:func:`~mrdetr.routing.instructive_attend`), unless the call convention defines
    ``attend_with_tokens(fn, q, k, v, tokens, tokens_pos, attn_mask, key_padding_mask)
    -> Tensor[B, Q, C]`` (``fn``: the host's own forward or the route's copy; ``tokens``,
    ``tokens_pos``: ``[n, C]``): then the family sends the tokens through its own projections
    (Conditional / DAB-DETR's separate content and position projections).
    """

    def __init__(self, state: RouteModules, rp, layer: int, module: nn.Module, call, orig):
        self.state, self.rp, self.layer, self.module = state, rp, layer, module
        self.call, self.orig = call, orig

    def __call__(self, *args, **kwargs):
        layout, plan = self.rp.layout, self.state.plan
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
        for g in plan.packs("self_attn", layout.num_routes):
            if g.owner is None:  # primary alone when it carries denoising queries
                batches = [(0,), g.routes[1:]] if dn else [g.routes]
                for idx in filter(None, batches):
                    inputs = [gather(t, idx, 0) for t in (qs, ks, vs)]  # [R'*B, L, C]
                    pad = None if kpm is None else gather(kpms, idx, 0)
                    m = mask if idx[0] == 0 else aux_mask
                    y = self.call.call(self.orig, *inputs, m, pad)
                    for i, part in zip(idx, y.chunk(len(idx)), strict=True):
                        outs[i] = part
                continue
            i, own = g.routes[0], self.state.aux[self.layer][g.owner]
            attn = getattr(own, "self_attn", None)
            if hasattr(own, "tokens"):
                host = self.module if attn is None else attn
                with_tokens = getattr(self.call, "attend_with_tokens", None)
                if with_tokens is not None:  # the family's own projections (Conditional, DAB)
                    fn = self.orig if attn is None else attn
                    outs[i] = with_tokens(fn, qs[i], ks[i], vs[i], own.tokens, own.tokens_pos,
                                          aux_mask, kpms[i])  # fmt: skip
                    continue
                w = attention_weights(host)
                # a call convention may bring its own (LW-DETR: query groups kept apart)
                attend = getattr(self.call, "instructive_attend", instructive_attend)
                outs[i] = attend(
                    qs[i], ks[i], vs[i], w, own.tokens + own.tokens_pos, own.tokens,
                    attn_mask=aux_mask, key_padding_mask=kpms[i],
                    dropout_p=w.dropout if host.training else 0.0,
                )[0]  # fmt: skip
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
def packed(state: RouteModules, rp, call_for) -> Iterator[None]:
    """Route-aware forwards on the host's sub-modules for the duration of the block.

    Args:
        state: the wrapped decoder's :class:`~mrdetr.adapters.route_modules.RouteModules`.
        rp: this call's :class:`~mrdetr.adapters.integration.RoutePass` (its layout is read,
            its ``hidden`` filled with every layer's output(s) as the layer runs).
        call_for: ``LayerModules -> call convention`` of the self-attention (e.g.
            :class:`MHACall`).
    """
    installed: list[nn.Module] = []
    hooks = []
    rp.hidden = [[] for _ in state.host_layers]
    plan = state.plan
    try:
        for li, host in enumerate(state.host_layers):
            call = call_for(host)
            _install(host.self_attn, lambda o, h=host, c=call, li=li: _SelfAttentionForward(
                state, rp, li, h.self_attn, c, o), installed)  # fmt: skip
            if plan.owners("self_attn_norm"):
                _install(host.self_attn_norm, lambda o, li=li: _RoutedForward(
                    state, rp, li, "self_attn_norm", None, o), installed)  # fmt: skip
            if plan.owners("ffn"):
                for j, m in enumerate(host.ffn):
                    _install(m, lambda o, li=li, j=j: _RoutedForward(
                        state, rp, li, "ffn", j, o), installed)  # fmt: skip
            hooks.append(host.layer.register_forward_hook(
                lambda _m, _i, out, li=li: rp.hidden[li].append(out)))  # fmt: skip
        yield
    finally:
        for h in hooks:
            h.remove()
        for m in installed:
            del m.forward
