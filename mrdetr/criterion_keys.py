"""Loss-dict key conventions of :class:`~mrdetr.criterion.MultiRouteCriterion`.

``"mrdetr"`` (default): ``"{term}/{route}/layer{l}"``, ``"{term}/{route}/enc"``, plus ``"loss"``.

``"detr"``: the DETR / Deformable-DETR engine's names, so that their training loop's
``sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)`` with
``weight_dict = criterion.weight_dict`` is the criterion's weighted total:

====================================  ======================================================
prediction set                        key (``loss_class`` is named ``loss_ce``)
====================================  ======================================================
primary route, last layer             ``loss_ce``, ``loss_bbox``, ``loss_giou``
primary route, layer ``l`` (earlier)  ``loss_ce_{l}``, ...
primary route, encoder proposals      ``loss_ce_enc``, ...
auxiliary route ``r``                 the same with ``_{r}`` appended: ``loss_ce_aux_ffn``,
                                      ``loss_ce_0_aux_ffn``, ``loss_ce_enc_aux_ffn``
matcher group label ``g``             ``_{g}`` appended after the route (``loss_ce_o2m``)
mixture-of-experts loss               ``loss_moe`` + the route suffix
====================================  ======================================================

The primary route is the matcher's first route. ``criterion.weight_dict`` then maps every key a
forward produced to its effective weight (term weight x route weight x encoder weight); it is
filled by each forward (the engines read it after calling the criterion). There is no
``"loss"`` key in this style (engines that sum every value would count it twice).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["KEY_STYLES", "LossKeys", "check_weights", "detr_key"]

KEY_STYLES = ("mrdetr", "detr")
_RENAMED = {"loss_class": "loss_ce"}


def detr_key(term: str, route: str, label: str | None, suffix: str, *, primary: str,
             last_layer: int) -> str:  # fmt: skip
    """The DETR-style key of ``term`` for one prediction set.

    Args:
        term: the criterion's term (``"loss_class"``, ``"loss_bbox"``, ...).
        route, label: the route and its matcher group label (None without groups).
        suffix: ``"layer{l}"``, ``"enc"`` or ``""`` (route-level terms such as ``loss_moe``).
        primary: name of the primary route (no route suffix).
        last_layer: index of the route's last decoder layer (no layer suffix).
    """
    name = _RENAMED.get(term, term)
    if suffix == "enc":
        name += "_enc"
    elif suffix.startswith("layer") and int(suffix[5:]) != last_layer:
        name += f"_{int(suffix[5:])}"
    if route != primary:
        name += f"_{route}"
    return name if label is None else f"{name}_{label}"


class LossKeys:
    """Names one forward's losses in a key style and, in the ``"detr"`` style, records each
    key's effective weight in ``weight_dict`` (the criterion's, updated in place).

    Args:
        style: ``"mrdetr"`` or ``"detr"``.
        primary: the primary route's name.
        weight_dict: the dict to fill (``"detr"`` style only).
    """

    def __init__(self, style: str, primary: str, weight_dict: dict) -> None:
        self.style, self.primary, self.weight_dict = style, primary, weight_dict
        self.seen: set[str] = set()

    def add(self, term: str, route: str, label, suffix: str, sets, weight: float) -> str:
        """The key of ``term`` for one prediction set of ``route`` (``sets``: the route's
        ``[(suffix, predictions)]``; ``suffix`` ``""`` for route-level terms); records
        ``weight`` under it (``"detr"``).

        Raises:
            ValueError: two terms of one forward get the same DETR-style key.
        """
        if self.style == "mrdetr":
            tag = route if label is None else f"{route}:{label}"
            return f"{term}/{tag}/{suffix}" if suffix else f"{term}/{route}"
        last = sum(s.startswith("layer") for s, _ in sets) - 1
        key = detr_key(term, route, label, suffix, primary=self.primary, last_layer=last)
        if key in self.seen:
            raise ValueError(
                f"MultiRouteCriterion: two loss terms are both named {key!r} in key_style="
                "'detr' (a route named like a layer suffix, e.g. 'enc'?); rename the route"
            )
        self.seen.add(key)
        self.weight_dict[key] = float(weight)
        return key


def check_weights(term_weights, route_weights, routes, encoder_weight, terms) -> None:
    """Raise a ``ValueError`` for a ``term_weights`` key not in ``terms``, a ``route_weights``
    key not in ``routes`` (the matcher's), or a weight that is not a finite number (see
    :meth:`MultiRouteCriterion.check_weights <mrdetr.criterion.MultiRouteCriterion.check_weights>`).
    """
    unknown = set(term_weights) - set(terms)
    if unknown:
        raise ValueError(f"weight_dict: unknown terms {sorted(unknown)}; expected {terms}")
    unknown = set(route_weights) - set(routes)
    if unknown:
        raise ValueError(
            f"route_weights: unknown routes {sorted(unknown)}; the matcher's routes are "
            f"{list(routes)}"
        )
    named = [("encoder_weight", encoder_weight)]
    named += [(f"weight_dict[{k!r}]", v) for k, v in term_weights.items()]
    named += [(f"route_weights[{k!r}]", v) for k, v in route_weights.items()]
    for name, v in named:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, received {v!r}")
