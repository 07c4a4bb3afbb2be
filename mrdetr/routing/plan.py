"""``RoutePlan``: which module every route uses for every sub-layer, decided once per route set.

This is the one place the route-sharing rule lives. Everything that runs routes reads it:
:class:`~mrdetr.layers.MultiRouteDecoderLayer` (routes on a leading ``[R, ...]`` axis), the
adapters (:mod:`mrdetr.adapters`, routes tiled along the query axis of a host decoder) and the
builder of a route's own modules (:mod:`mrdetr.routing.owned`). The ownership rule is the one
of :mod:`mrdetr.routes`:

============================  ========================================================
sub-layer                     an auxiliary route owns it when
============================  ========================================================
``"self_attn"``               ``own_self_attn`` or ``num_instruction_tokens > 0``
``"self_attn_norm"``          ``num_instruction_tokens > 0`` (Route-3's own norm)
``"cross_attn"``              ``own_cross_attn``
``"ffn"``                     ``own_ffn``
============================  ========================================================

Every other route shares the primary route's module: all the sharing routes form one
:class:`Pack` (``owner=None``) so that the module is called once over all of them; every owner
forms a pack of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..routes import Route, validate_routes

__all__ = ["Pack", "RoutePlan", "SUBLAYERS"]

_OWNS: dict[str, Callable[[Route], bool]] = {
    "self_attn": lambda r: r.own_self_attn or r.num_instruction_tokens > 0,
    "self_attn_norm": lambda r: r.num_instruction_tokens > 0,
    "cross_attn": lambda r: r.own_cross_attn,
    "ffn": lambda r: r.own_ffn,
}
SUBLAYERS: tuple[str, ...] = tuple(_OWNS)
"""Sub-layers a route can own: ``self_attn``, ``self_attn_norm``, ``cross_attn``, ``ffn``."""


class Pack(NamedTuple):
    """Routes that run one sub-layer through the same module.

    Attributes:
        owner: name of the auxiliary route owning the module, or None for the primary route's
            (shared) module.
        routes: indices (into the route set, ascending) of the routes in the pack.
    """

    owner: str | None
    routes: tuple[int, ...]

    @property
    def is_contiguous(self) -> bool:
        """True when ``routes`` is a run ``i, i+1, ...`` (a slice, no gather needed)."""
        return self.routes == tuple(range(self.routes[0], self.routes[0] + len(self.routes)))


class RoutePlan:
    """Packs of routes per sub-layer for a validated route set (primary first).

    Args:
        routes: the route set (:mod:`mrdetr.routes`).

    ``plan.packs("ffn")`` -> ``(Pack(None, (0, 2)), Pack("aux_ffn", (1,)))`` for
    ``routes.mr_detr()``; ``plan.packs(s, 1)`` is always ``(Pack(None, (0,)),)`` (the primary
    route alone touches no auxiliary module).
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = validate_routes(routes)
        self._packs = {
            (s, n): _resolve(self.routes[:n], owns)
            for s, owns in _OWNS.items()
            for n in range(1, len(self.routes) + 1)
        }

    def __len__(self) -> int:
        return len(self.routes)

    def owns(self, route: Route, sublayer: str) -> bool:
        """Whether ``route`` owns ``sublayer`` (always False for the primary route)."""
        self._check_sublayer(sublayer)
        return route is not self.routes[0] and _OWNS[sublayer](route)

    def owners(self, sublayer: str) -> tuple[Route, ...]:
        """The auxiliary routes owning ``sublayer``, in route order."""
        return tuple(r for r in self.routes[1:] if self.owns(r, sublayer))

    def packs(self, sublayer: str, num_routes: int | None = None) -> tuple[Pack, ...]:
        """Non-empty packs of the first ``num_routes`` routes (default all) for ``sublayer``:
        the shared pack first, then each owner in route order."""
        self._check_sublayer(sublayer)
        n = len(self.routes) if num_routes is None else num_routes
        if not 1 <= n <= len(self.routes):
            raise ValueError(f"num_routes must be in 1..{len(self.routes)}, got {num_routes}")
        return self._packs[(sublayer, n)]

    @staticmethod
    def _check_sublayer(sublayer: str) -> None:
        if sublayer not in _OWNS:
            raise ValueError(f"sublayer must be one of {SUBLAYERS}, got {sublayer!r}")

    def __repr__(self) -> str:
        return f"RoutePlan({[r.name for r in self.routes]})"


def _resolve(routes: tuple[Route, ...], owns: Callable[[Route], bool]) -> tuple[Pack, ...]:
    shared = tuple(i for i, r in enumerate(routes) if i == 0 or not owns(r))
    owners = tuple(Pack(r.name, (i,)) for i, r in enumerate(routes) if i > 0 and owns(r))
    return (Pack(None, shared), *owners)
