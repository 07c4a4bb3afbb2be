"""Training routes of a multi-route decoder: ``Route``, validation, and presets.

A route is one way of running the shared decoder during training. The primary route (always
first) is the plain one-to-one decoder kept at inference; every auxiliary route shares the
primary route's modules except the ones it *owns*, and may add instruction tokens to its
self-attention (Mr. DETR's instructive self-attention).

Ownership rule (it follows the public reference implementation): owning a sub-layer means owning
its weights; the LayerNorm after it stays shared (the reference's Route-1 owns its FFN and shares
the FFN's LayerNorm), except that a route with instruction tokens owns the LayerNorm after its
self-attention (the reference's Route-3).

The AP figures quoted below are the paper's (COCO val, Deformable-DETR++ R50, 12 epochs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Route",
    "SUPERVISIONS",
    "validate_routes",
    "mr_detr",
    "mr_detr_moe",
    "baseline",
    "paper_ablation",
]

Supervision = Literal["o2o", "o2m", "both"]
SUPERVISIONS: tuple[str, ...] = ("o2o", "o2m", "both")


@dataclass(frozen=True)
class Route:
    """One training route of a multi-route decoder.

    Args:
        name: unique name within a route set; auxiliary parameters live under
            ``aux.<name>.`` in the layer's state dict, so it must be a valid identifier.
        supervision: ``"o2o"`` (one-to-one Hungarian), ``"o2m"`` (one-to-many) or ``"both"``
            (one route trained with both losses: the paper's "share all" row).
        own_self_attn: the route has its own self-attention weights.
        own_cross_attn: the route has its own deformable cross-attention (it cannot be packed
            with the other routes' cross-attention call).
        own_ffn: the route has its own FFN.
        num_instruction_tokens: learnable instruction tokens in the route's self-attention
            (0 = plain self-attention). With ``own_self_attn=False`` the tokens attend through the
            primary route's weights, as Mr. DETR's Route-3.
        ffn_experts: 0 (a plain FFN) or ``E >= 2``: the route's own FFN is a route-aware mixture
            of ``E`` experts (:class:`~mrdetr.layers.moe.MoEFFN`, Mr. DETR++); needs
            ``own_ffn=True``.
        ffn_top_k: experts per query of the mixture, in ``1 .. ffn_experts``.
    """

    name: str
    supervision: Supervision = "o2o"
    own_self_attn: bool = False
    own_cross_attn: bool = False
    own_ffn: bool = False
    num_instruction_tokens: int = 0
    ffn_experts: int = 0
    ffn_top_k: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"name must be a Python identifier, got {self.name!r}")
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {self.supervision!r}")
        if not isinstance(self.num_instruction_tokens, int) or self.num_instruction_tokens < 0:
            raise ValueError(
                f"num_instruction_tokens must be an int >= 0, got {self.num_instruction_tokens!r}"
            )
        e, k = self.ffn_experts, self.ffn_top_k
        if isinstance(e, bool) or not isinstance(e, int) or e < 0 or e == 1:
            raise ValueError(f"ffn_experts must be 0 or an int >= 2, got {e!r}")
        if e and not self.own_ffn:
            raise ValueError(f"route {self.name!r}: ffn_experts={e} needs own_ffn=True")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(e, 1):
            raise ValueError(f"ffn_top_k must be an int in [1, max(ffn_experts, 1)], got {k!r}")

    @property
    def is_plain(self) -> bool:
        """True when the route owns nothing and has no instruction tokens (shares everything)."""
        return not (
            self.own_self_attn
            or self.own_cross_attn
            or self.own_ffn
            or self.num_instruction_tokens > 0
        )


def validate_routes(routes: Sequence[Route]) -> tuple[Route, ...]:
    """Check a route set and return it as a tuple.

    The first route is the primary one: it owns nothing, has no instruction tokens, and is
    supervised one-to-one (``"o2o"`` or ``"both"``). Names are unique.

    Raises:
        TypeError: ``routes`` is not a sequence of routes (a route-set function not called, a
            single :class:`Route`).
        ValueError: naming the offending route.
    """
    if isinstance(routes, Route):
        raise TypeError(
            f"routes must be a sequence of Route, primary first (e.g. routes.mr_detr()), got a "
            f"single Route {routes.name!r}: pass [primary, ..., {routes.name!r}]"
        )
    if callable(routes):
        name = getattr(routes, "__name__", type(routes).__name__)
        raise TypeError(
            f"routes must be a sequence of Route, got the function {name}: call it "
            f"(routes={name}())"
        )
    if isinstance(routes, (str, bytes)) or not hasattr(routes, "__iter__"):
        raise TypeError(f"routes must be a sequence of Route, got {type(routes).__name__}")
    routes = tuple(routes)
    if not routes:
        raise ValueError("routes must hold at least the primary route, got an empty sequence")
    for i, r in enumerate(routes):
        if not isinstance(r, Route):
            raise ValueError(f"routes[{i}] must be a Route, got {type(r).__name__}")
    primary = routes[0]
    if not primary.is_plain or primary.supervision == "o2m":
        raise ValueError(
            "routes[0] is the primary route: it must own nothing, have no instruction tokens and "
            f"be supervised 'o2o' or 'both', got {primary}"
        )
    names = [r.name for r in routes]
    if len(set(names)) != len(names):
        raise ValueError(f"route names must be unique, got {names}")
    return routes


def baseline() -> tuple[Route, ...]:
    """The primary route alone: a plain one-to-one decoder (paper row 1, 47.6 AP)."""
    return (Route("primary"),)


def mr_detr(num_instruction_tokens: int = 10) -> tuple[Route, ...]:
    """Mr. DETR's three routes, in order ``"primary"``, ``"aux_ffn"``, ``"aux_instruct"``.

    - ``primary`` (paper Route-2): one-to-one, shares everything, the only route at inference.
    - ``aux_ffn`` (Route-1): one-to-many, its own FFN.
    - ``aux_instruct`` (Route-3): one-to-many, instructive self-attention with
      ``num_instruction_tokens`` tokens through the primary route's attention weights.

    Paper: Route-2 alone 47.6 AP; Route-1 + Route-2 49.6 AP; all three routes 50.7 AP.
    """
    return (
        Route("primary"),
        Route("aux_ffn", supervision="o2m", own_ffn=True),
        Route("aux_instruct", supervision="o2m", num_instruction_tokens=num_instruction_tokens),
    )


def mr_detr_moe(
    num_instruction_tokens: int = 10, num_experts: int = 4, top_k: int = 1
) -> tuple[Route, ...]:
    """Mr. DETR's three routes with a route-aware mixture-of-experts FFN (Mr. DETR++, decoder
    only) in the second auxiliary route: ``"primary"``, ``"aux_ffn"`` (own FFN), and
    ``"aux_instruct"`` (instruction tokens, and its own FFN, a mixture of ``num_experts``
    experts with top-``top_k`` routing). Inference is unchanged: the primary route alone.
    See ``docs/moe.md`` for the design and its reasons.
    """
    return (
        Route("primary"),
        Route("aux_ffn", supervision="o2m", own_ffn=True),
        Route(
            "aux_instruct",
            supervision="o2m",
            num_instruction_tokens=num_instruction_tokens,
            own_ffn=True,
            ffn_experts=num_experts,
            ffn_top_k=top_k,
        ),
    )


def _aux(name: str, *, sa: bool = False, ca: bool = False, ffn: bool = False) -> Route:
    return Route(name, supervision="o2m", own_self_attn=sa, own_cross_attn=ca, own_ffn=ffn)


def _row(row: int) -> tuple[Route, ...]:
    if row == 1:
        return baseline()
    if row == 2:
        return (Route("primary", supervision="both"),)
    rows = {
        3: [_aux("aux_sa", sa=True)],
        4: [_aux("aux_ca", ca=True)],
        5: [_aux("aux_ffn", ffn=True)],
        6: [_aux("aux_ca_ffn", ca=True, ffn=True)],
        7: [_aux("aux_sa_ffn", sa=True, ffn=True)],
        8: [_aux("aux_sa_ca", sa=True, ca=True)],
        9: [_aux("aux_sa", sa=True), _aux("aux_ca", ca=True)],
        10: [_aux("aux_sa", sa=True), _aux("aux_ffn", ffn=True)],
        11: [_aux("aux_ca", ca=True), _aux("aux_ffn", ffn=True)],
        12: [_aux("aux_sa", sa=True), _aux("aux_ca", ca=True), _aux("aux_ffn", ffn=True)],
    }
    return (Route("primary"), *rows[row])


def paper_ablation(row: int) -> tuple[Route, ...]:
    """The route set of one row (1..12) of the paper's ablation table.

    Auxiliary routes are one-to-many; "not shared X" owns X only, "shared X" owns the other two.
    AP: the primary (o2o) route; "w/ NMS": the auxiliary o2m route evaluated with NMS.

    ====  =======================================  ======  ==========  ===========
    row   configuration                            routes  AP (o2o)    o2m w/ NMS
    ====  =======================================  ======  ==========  ===========
    1     one-to-one only                          1       47.6        \\-
    2     share all (one route, o2o + o2m)         1       41.6 (-6.0) 41.6
    3     not shared self-attention                2       49.7 (+2.1) 50.3
    4     not shared cross-attention               2       49.2 (+1.6) 50.0
    5     not shared FFN                           2       49.6 (+2.0) 50.1
    6     shared self-attention (own CA + FFN)     2       49.4 (+1.8) 50.3
    7     shared cross-attention (own SA + FFN)    2       49.4 (+1.8) 50.0
    8     shared FFN (own SA + CA)                 2       49.2 (+1.6) 50.0
    9     (3) + (4)                                3       49.4 (+1.8) 49.9
    10    (3) + (5)                                3       50.0 (+2.4) 50.8
    11    (4) + (5)                                3       49.0 (+1.4) 49.6
    12    (3) + (4) + (5)                          4       49.6 (+2.0) 50.2
    ====  =======================================  ======  ==========  ===========

    Route names: ``"primary"``, then ``"aux_sa"``, ``"aux_ca"``, ``"aux_ffn"`` for routes owning
    one sub-layer and ``"aux_ca_ffn"``, ``"aux_sa_ffn"``, ``"aux_sa_ca"`` for rows 6-8.

    Raises:
        ValueError: ``row`` is not an int in 1..12.
    """
    if not isinstance(row, int) or isinstance(row, bool) or not 1 <= row <= 12:
        raise ValueError(f"row must be an int in 1..12, got {row!r}")
    return _row(row)
