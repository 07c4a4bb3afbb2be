"""Where the routes sit in a tensor, and the one way packs of routes are run (:func:`dispatch`).

Routes are laid out along one axis of the tensors a sub-layer sees, in one of two ways:

- :class:`RouteStack`: a route axis of its own, ``[R, ...]`` (mrdetr's
  :class:`~mrdetr.layers.MultiRouteDecoderLayer`; one entry per route);
- :class:`RouteLayout`: segments of a host decoder's query axis, ``[dn ; Q x R]`` (the adapters;
  the ``dn`` leading denoising queries stay with the primary route).

Both answer the same three questions: :meth:`take` (a pack's routes of ``x``, a view when they
are adjacent), :meth:`parts` (a pack's output split back per route) and :meth:`join` (every
route's output put back in route order). :func:`dispatch` runs one module call per pack of a
:class:`~mrdetr.routing.plan.RoutePlan` with them, so routes that share a module run it once.
:func:`eval_prefix` is the eval-mode rule for a route axis: only the routes chosen to run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .plan import Pack

__all__ = ["RouteLayout", "RouteStack", "dispatch", "eval_prefix", "gather", "split", "tile"]


@dataclass(frozen=True)
class RouteStack:
    """Routes on a leading axis of their own: ``x [R, ...]``, entry ``i`` is route ``i``.

    Attributes:
        num_routes: ``R``.
    """

    num_routes: int

    def take(self, x: Tensor, pack: Pack) -> Tensor:
        """``x[pack.routes]`` (``[R', ...]``), a view when the routes are contiguous."""
        idx = pack.routes
        return x[idx[0] : idx[0] + len(idx)] if pack.is_contiguous else x[list(idx)]

    def parts(self, y: Tensor, pack: Pack) -> list[Tensor]:
        """The pack's output ``y [R', ...]`` per route (``[...]`` each)."""
        return [y[j] for j in range(len(pack.routes))]

    def join(self, outs: Sequence[Tensor]) -> Tensor:
        """Every route's ``[...]`` -> ``[R, ...]``."""
        return outs[0][None] if len(outs) == 1 else torch.stack(list(outs))


@dataclass(frozen=True)
class RouteLayout:
    """How the routes are laid out along the query axis: ``[dn ; Q (primary) ; Q ; ...]``.

    Attributes:
        num_routes: ``R``.
        num_queries: ``Q``, matching queries per route.
        num_denoising: ``dn``, leading denoising queries (primary route only).
        query_dim: query axis of the layers' hidden states (1 for ``[B, L, C]``, 0 for
            ``[L, B, C]``); the axis :meth:`take`, :meth:`parts` and :meth:`join` work on.
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

    def take(self, x: Tensor, pack: Pack) -> Tensor:
        """The pack's routes of packed ``x`` along :attr:`query_dim`: a view when adjacent."""
        idx, dim = pack.routes, self.query_dim
        if pack.is_contiguous:
            start = sum(self.sizes[: idx[0]])
            return x.narrow(dim, start, sum(self.sizes[i] for i in idx))
        return gather(split(x, self, dim), idx, dim)

    def parts(self, y: Tensor, pack: Pack) -> list[Tensor] | tuple[Tensor, ...]:
        """The pack's output ``y`` per route, split along :attr:`query_dim`."""
        if len(pack.routes) == 1:
            return [y]
        return y.split([self.sizes[i] for i in pack.routes], self.query_dim)

    def join(self, outs: Sequence[Tensor]) -> Tensor:
        """Every route's slice -> the packed tensor (``dn + R * Q`` along :attr:`query_dim`)."""
        return torch.cat(list(outs), self.query_dim)


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


def gather(chunks: Sequence[Tensor], idx: Sequence[int], dim: int) -> Tensor:
    """``chunks[idx]`` concatenated along ``dim`` (the chunk itself for one index)."""
    return chunks[idx[0]] if len(idx) == 1 else torch.cat([chunks[i] for i in idx], dim)


def dispatch(
    axis: RouteStack | RouteLayout,
    packs: Sequence[Pack],
    run: Callable[..., Tensor],
    *inputs: Tensor | None,
) -> Tensor:
    """Run ``run(pack, *taken_inputs)`` once per pack and put every route's output in place.

    Args:
        axis: where the routes are in ``inputs`` and in what ``run`` returns.
        packs: ``plan.packs(sublayer, num_routes)``: every route in exactly one pack.
        run: ``(pack, *inputs of the pack's routes) -> output of the pack's routes``; picks the
            module (the primary's for ``pack.owner is None``, else the owner's).
        inputs: tensors with every route along ``axis`` (None passes through as None).

    Returns:
        The routes' outputs joined along ``axis``, in route order.
    """
    outs: list[Tensor | None] = [None] * axis.num_routes
    for pack in packs:
        y = run(pack, *(None if t is None else axis.take(t, pack) for t in inputs))
        for i, part in zip(pack.routes, axis.parts(y, pack), strict=True):
            outs[i] = part
    return axis.join(outs)


def eval_prefix(training: bool, num_eval: int, *xs: Tensor | None) -> tuple[Tensor | None, ...]:
    """The routes an eval pass runs: the first ``num_eval`` of every ``[R, ...]`` tensor.

    Routes are a prefix of the route axis, so eval keeps routes ``0 .. num_eval - 1`` (the
    primary alone by default) and ignores the rest. In training, or when ``xs[0]`` holds no more
    than ``num_eval`` routes, ``xs`` is returned unchanged. None entries stay None.
    """
    if training or xs[0].shape[0] <= num_eval:
        return xs
    return tuple(None if x is None else x[:num_eval] for x in xs)
