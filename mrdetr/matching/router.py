"""``RouteMatcher``: one matcher (or a *matcher group*, several labelled matchers) per route.

"Group" here always means a matcher group: the matchers that supervise one route (e.g.
``{"o2o": HungarianMatcher(), "o2m": OneToManyMatcher()}`` for a route with supervision
``"both"``). It is unrelated to how the decoder packs routes together for a sub-layer (the
route plan's *packs*, :mod:`mrdetr.layers.route_plan`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from ..routes import SUPERVISIONS
from .hungarian import HungarianMatcher
from .indices import MatchIndices
from .one_to_many import OneToManyMatcher

__all__ = ["RouteMatcher"]


class RouteMatcher:
    """Give each route its own matcher.

    Args:
        matchers: ``{route_name: matcher}``. A matcher is any callable ``matcher(outputs,
            targets) -> list of (pred_idx, gt_idx)``; an entry may also be a *matcher group*
            (several matchers supervising the same route's predictions), a mapping
            ``{label: matcher}`` (for example ``{"o2o": HungarianMatcher(), "o2m":
            OneToManyMatcher()}``), whose route is supervised by every matcher of the group.

    ``router(route_name, outputs, targets)`` returns what the route's entry returns: a list of
    ``B`` pairs ``(pred_idx (Tensor[M_b]), gt_idx (Tensor[M_b]))`` for a single matcher, or a dict
    ``{label: list of B pairs}`` for a group. :meth:`groups` always gives the dict form.
    """

    def __init__(self, matchers: Mapping[str, object]) -> None:
        if not isinstance(matchers, Mapping):
            raise ValueError(
                f"RouteMatcher: matchers must be a mapping {{route_name: matcher}}, received "
                f"{type(matchers).__name__}"
            )
        for name, m in matchers.items():
            if not isinstance(name, str):
                raise ValueError(f"RouteMatcher: route names must be str, received {name!r}")
            group = m if isinstance(m, Mapping) else {"": m}
            if not group:
                raise ValueError(f"RouteMatcher: route {name!r} has an empty matcher group")
            for label, fn in group.items():
                if not callable(fn):
                    where = f"route {name!r}" + (f", label {label!r}" if label else "")
                    raise ValueError(
                        f"RouteMatcher: {where}: matcher must be callable, received "
                        f"{type(fn).__name__}"
                    )
        self.matchers = dict(matchers)

    @classmethod
    def for_routes(
        cls,
        routes: Iterable,
        one_to_one: object | None = None,
        one_to_many: object | None = None,
        classification: str = "sigmoid",
    ) -> RouteMatcher:
        """Default matchers for a route set, following each route's supervision.

        ``routes`` are objects with ``name: str`` and ``supervision`` in ``"o2o"`` (gets
        ``one_to_one``, default :class:`HungarianMatcher`), ``"o2m"`` (gets ``one_to_many``,
        default :class:`OneToManyMatcher`) or ``"both"`` (gets the group ``{"o2o": one_to_one,
        "o2m": one_to_many}``, so the route returns a dict with both results). Routes with the
        same supervision share one matcher instance. ``classification`` (``"sigmoid"`` or
        ``"softmax"``, as :class:`~mrdetr.criterion.MultiRouteCriterion`'s) picks the class
        cost of the default matchers: focal / sigmoid probability, or DETR's softmax
        probability.
        """
        if classification not in ("sigmoid", "softmax"):
            raise ValueError(
                "RouteMatcher.for_routes: classification must be 'sigmoid' or 'softmax', "
                f"received {classification!r}"
            )
        if one_to_one is None:
            one_to_one = HungarianMatcher(
                class_cost="softmax" if classification == "softmax" else "focal"
            )
        if one_to_many is None:
            one_to_many = OneToManyMatcher(classification=classification)
        matchers: dict[str, object] = {}
        for i, route in enumerate(routes):
            name = getattr(route, "name", None)
            sup = getattr(route, "supervision", None)
            if not isinstance(name, str):
                raise ValueError(
                    f"RouteMatcher.for_routes: routes[{i}].name must be a str, received {name!r}"
                )
            if name in matchers:
                raise ValueError(f"RouteMatcher.for_routes: route name {name!r} appears twice")
            if sup == "o2o":
                matchers[name] = one_to_one
            elif sup == "o2m":
                matchers[name] = one_to_many
            elif sup == "both":
                matchers[name] = {"o2o": one_to_one, "o2m": one_to_many}
            else:
                raise ValueError(
                    f"RouteMatcher.for_routes: route {name!r}: supervision must be one of "
                    f"{SUPERVISIONS}, received {sup!r}"
                )
        return cls(matchers)

    def __contains__(self, route: object) -> bool:
        return route in self.matchers

    def __iter__(self) -> Iterator[str]:
        return iter(self.matchers)

    def __len__(self) -> int:
        return len(self.matchers)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {v!r}" for k, v in self.matchers.items())
        return f"RouteMatcher({{{inner}}})"

    def _entry(self, route: str):
        if route not in self.matchers:
            raise ValueError(
                f"RouteMatcher: no matcher for route {route!r}; routes: {sorted(self.matchers)}"
            )
        return self.matchers[route]

    def __call__(self, route: str, outputs: Mapping, targets: Sequence[Mapping]):
        """Match ``outputs`` of route ``route`` against ``targets`` (see the class docstring)."""
        entry = self._entry(route)
        if isinstance(entry, Mapping):
            return {label: m(outputs, targets) for label, m in entry.items()}
        return entry(outputs, targets)

    def entries(self, route: str) -> dict[str | None, object]:
        """The matchers of ``route`` without calling them: ``{label: matcher}`` for a matcher
        group, ``{None: matcher}`` for a single matcher."""
        entry = self._entry(route)
        return dict(entry) if isinstance(entry, Mapping) else {None: entry}

    def groups(
        self, route: str, outputs: Mapping, targets: Sequence[Mapping]
    ) -> dict[str | None, MatchIndices]:
        """Like calling, but always a dict: ``{label: indices}`` for a matcher group and
        ``{None: indices}`` for a single matcher."""
        entry = self._entry(route)
        if isinstance(entry, Mapping):
            return {label: m(outputs, targets) for label, m in entry.items()}
        return {None: entry(outputs, targets)}
