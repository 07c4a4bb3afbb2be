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

__all__ = ["KEY_STYLES", "detr_key"]

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
