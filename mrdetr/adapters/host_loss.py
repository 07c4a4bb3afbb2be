"""Auxiliary routes trained by an HF detector's own loss function, matched one-to-many.

:func:`host_route_loss` calls the family's own loss function (``model.loss_function``, arguments
decided by :data:`~mrdetr.adapters.host_loss_families.FAMILIES`) on one route's predictions, with
a :class:`~mrdetr.adapters.host_matcher.HostMatcher` in place of the Hungarian matcher that the
loss function builds. :func:`host_auxiliary_loss` sums the routes with per-route weights.

Route predictions are mrdetr's layout (what ``hf_route_predictions`` returns per route)::

    {"pred_logits": Tensor[B, Q, K'], "pred_boxes": Tensor[B, Q, 4],       # last decoder layer
     "aux_outputs": [{"pred_logits": ..., "pred_boxes": ...}, ...],       # layers 0 .. L-2
     "enc_outputs": {"pred_logits": Tensor[B, S, K'], "pred_boxes": ...}} # optional

(``"logits"`` is accepted for ``"pred_logits"``; D-FINE / DEIM layers also hold
``"pred_corners"`` and ``"ref_points"``, and a route may hold ``"pre_outputs"``
``{"pred_logits", "pred_boxes"}``, the prediction their decoders make before layer 1's.)
``K'`` is the family's own logit width (``K + 1`` for DETR's no-object). ``labels`` are
transformers' labels: a list of ``B`` dicts ``{"class_labels": Tensor[N_b] int64, "boxes":
Tensor[N_b, 4]}`` (cxcywh, normalised).

Encoder proposals: a route is supervised on encoder proposals only when its dict holds
``"enc_outputs"`` (e.g. Route-3 with its own proposals); the shared proposals are the primary
route's, supervised once by the host's own loss. Families whose loss function always takes
proposals (RT-DETR, D-FINE, LW-DETR) are then given the route's last layer as a stand-in, and
the stand-in's terms are removed from ``loss_dict`` and from the total.

The matcher is replaced by swapping, during the call and for the calling thread only, the
matcher class that the loss function looks up in its ``transformers.loss`` module for a callable
that returns our matcher (other threads, e.g. the host's own loss, still get the original
class).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import threading
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from ..matching import Matcher
from .host_loss_families import HostLossFamily, family_of
from .host_matcher import HostMatcher

__all__ = ["DEFAULT_ROUTE_WEIGHT", "host_auxiliary_loss", "host_route_loss"]

DEFAULT_ROUTE_WEIGHT = 1.0
"""Weight of a route missing from ``route_weights`` (as ``MultiRouteCriterion``; the paper sums
the primary and the auxiliary routes' losses with equal weights)."""

_lock = threading.Lock()
_local = threading.local()
_installed: dict[tuple[str, str], list] = {}  # site -> [original class, users]


class _MatcherSite:
    """Stands in for a loss module's matcher class while :func:`host_route_loss` runs: returns
    the calling thread's override, else builds the original class."""

    def __init__(self, original) -> None:
        self.original = original

    def __call__(self, *args, **kwargs):
        override = getattr(_local, "matcher", None)
        return self.original(*args, **kwargs) if override is None else override


@contextlib.contextmanager
def _matcher_override(family: HostLossFamily, matcher) -> Iterator[None]:
    sites = []
    with _lock:
        for module_name, attr in family.matcher_sites:
            module = importlib.import_module(f"transformers.loss.{module_name}")
            if (module_name, attr) not in _installed:
                original = getattr(module, attr, None)
                if original is None:
                    raise RuntimeError(
                        f"transformers.loss.{module_name} has no {attr}: this transformers "
                        f"version builds the {family.name} matcher differently"
                    )
                _installed[(module_name, attr)] = [original, 0]
                setattr(module, attr, _MatcherSite(original))
            _installed[(module_name, attr)][1] += 1
            sites.append((module, module_name, attr))
    previous = getattr(_local, "matcher", None)
    _local.matcher = matcher
    try:
        yield
    finally:
        _local.matcher = previous
        with _lock:
            for module, module_name, attr in sites:
                entry = _installed[(module_name, attr)]
                entry[1] -= 1
                if entry[1] == 0:
                    setattr(module, attr, entry[0])
                    del _installed[(module_name, attr)]


def _get(layer: Mapping, key: str, where: str) -> Tensor:
    value = layer.get(key, layer.get("logits") if key == "pred_logits" else None)
    if not isinstance(value, Tensor):
        raise ValueError(f"route_predictions{where} has no tensor {key!r} (keys: {sorted(layer)})")
    return value


def _loss_arguments(family: HostLossFamily, model, route: Mapping, labels):
    """``(args, kwargs, stand_in)`` of the family's loss function for one route's predictions;
    ``stand_in``: the encoder proposals are the route's last layer (their terms to be dropped)."""
    if not isinstance(route, Mapping):
        raise ValueError(f"route_predictions must be a dict, received {type(route).__name__}")
    aux = route.get("aux_outputs") or []
    layers = [*aux, route]
    where = [f"['aux_outputs'][{i}]" for i in range(len(aux))] + [""]
    config = model.config
    expected = getattr(config, "decoder_layers", None)
    if (
        getattr(config, "auxiliary_loss", False)
        and expected is not None
        and len(layers) != expected
    ):
        raise ValueError(
            f"route_predictions must hold every decoder layer (config.decoder_layers = "
            f"{expected}: the last in the dict, {expected - 1} in 'aux_outputs'), received "
            f"{len(layers)}"
        )

    def stack(key: str, pre=None) -> Tensor:
        items = [_get(x, key, w) for x, w in zip(layers, where, strict=True)]
        if pre is not None:
            items.insert(0, _get(pre, key, f"[{family.pre_layer!r}]"))
        return torch.stack(items, family.layer_dim)

    pre = route.get(family.pre_layer) if family.pre_layer else None
    logits, boxes = _get(route, "pred_logits", ""), _get(route, "pred_boxes", "")
    text = []
    for key in family.text_inputs:  # Grounding DINO: label_maps, text_mask (from the prompt)
        if key not in route:
            raise ValueError(f"route_predictions has no {key!r} (keys: {sorted(route)})")
        text.append(route[key])
    args = [logits, labels, logits.device, boxes, config, *text]
    args += [stack("pred_logits", pre), stack("pred_boxes", pre)]
    kwargs = {kw: stack(key) for key, kw in family.layer_extras}
    enc, stand_in = route.get("enc_outputs"), False
    if family.encoder != "none":
        if enc is None:
            enc, stand_in = {"pred_logits": logits.detach(), "pred_boxes": boxes.detach()}, True
        pair = (
            _get(enc, "pred_logits", "['enc_outputs']"),
            _get(enc, "pred_boxes", "['enc_outputs']"),
        )
        if family.encoder == "topk":
            kwargs.update(enc_topk_logits=pair[0], enc_topk_bboxes=pair[1])
        elif family.encoder == "keywords":
            kwargs.update(encoder_logits=pair[0], encoder_pred_boxes=pair[1])
        else:
            args.extend(pair)
    return args, kwargs, stand_in


def host_route_loss(
    model, route_predictions: Mapping, labels, matcher=None
) -> tuple[Tensor, dict[str, Tensor]]:
    """One route's loss by the HF family's own loss function, with ``matcher`` in place of its
    Hungarian matcher.

    Args:
        model: an HF detector of a family in :data:`~mrdetr.adapters.host_loss_families.FAMILIES`
            (wrapped or not); its ``config`` and ``loss_function`` are used.
        route_predictions: one route's predictions (layout in the module docstring).
        labels: transformers' labels, ``B`` dicts ``{"class_labels", "boxes"}``.
        matcher: ``None`` (default: a :class:`HostMatcher` with ``OneToManyMatcher()`` and the
            family's class score), an mrdetr :class:`~mrdetr.matching.Matcher` (wrapped into a
            ``HostMatcher``), or any callable with transformers' matcher interface (used as is,
            e.g. the family's own Hungarian matcher).

    Returns:
        ``(loss Tensor[], loss_dict)``: the family's own total and terms (its keys: ``loss_ce``,
        ``loss_bbox_0``, ``loss_vfl_aux_0``, ...; values weighted or not, as the family returns
        them), normalised by the number of gt boxes as the family does.
    """
    family = family_of(model)
    score = family.class_score(model.config)
    if matcher is None:
        matcher = HostMatcher(score)
    elif isinstance(matcher, Matcher):
        matcher = HostMatcher(score, matcher)
    elif not callable(matcher):
        raise TypeError(f"matcher must be callable, received {type(matcher).__name__}")
    args, kwargs, stand_in = _loss_arguments(family, model, route_predictions, labels)
    with _matcher_override(family, matcher):
        loss, loss_dict, _ = model.loss_function(*args, **kwargs)
    if stand_in:
        n = len(route_predictions.get("aux_outputs") or []) + 1
        loss_dict = {k: v for k, v in loss_dict.items() if not family.encoder_key(k, n)}
        loss = sum(family.weight(k, model.config) * v for k, v in loss_dict.items())
    return loss, dict(loss_dict)


def _check_route_weights(route_weights, routes: list[str]) -> dict[str, float]:
    if route_weights is None:
        return {}
    if not isinstance(route_weights, Mapping):
        raise ValueError(
            "route_weights must be a dict {route: weight}, received "
            f"{type(route_weights).__name__}"
        )
    unknown = sorted(set(route_weights) - set(routes))
    if unknown:
        raise ValueError(f"route_weights: unknown routes {unknown}; the routes are {routes}")
    for name, w in route_weights.items():
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ValueError(
                f"route_weights[{name!r}] must be a finite number >= 0, received {w!r}"
            )
    return dict(route_weights)


def host_auxiliary_loss(
    model,
    predictions_per_route: Mapping[str, Mapping],
    labels,
    route_weights: Mapping[str, float] | None = None,
    matcher=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of :func:`host_route_loss` over the auxiliary routes.

    Args:
        model: the HF detector (see :func:`host_route_loss`).
        predictions_per_route: ``{route name: route predictions}`` of the routes to supervise
            (the auxiliary ones: the primary route's loss is the host's own).
        labels: transformers' labels.
        route_weights: ``{route: weight >= 0}``; a route not named gets
            :data:`DEFAULT_ROUTE_WEIGHT`; a weight of 0 drops the route (not computed).
        matcher: as :func:`host_route_loss`, or a dict ``{route: matcher}``.

    Returns:
        ``(loss Tensor[], loss_dict)``: ``sum(weight[r] * loss_r)`` and every route's terms
        under ``"{route}/{key}"`` (unscaled by the route weight).

    Raises:
        ValueError: ``route_weights`` names a route not in ``predictions_per_route`` or holds a
            negative or non-finite weight; ``predictions_per_route`` is empty.
    """
    if not isinstance(predictions_per_route, Mapping) or not predictions_per_route:
        raise ValueError("predictions_per_route must be a non-empty dict {route: predictions}")
    routes = list(predictions_per_route)
    weights = _check_route_weights(route_weights, routes)
    matchers = matcher if isinstance(matcher, Mapping) else dict.fromkeys(routes, matcher)
    total, loss_dict = None, {}
    for route, predictions in predictions_per_route.items():
        w = float(weights.get(route, DEFAULT_ROUTE_WEIGHT))
        if w == 0.0:
            continue
        loss, terms = host_route_loss(model, predictions, labels, matchers.get(route))
        total = w * loss if total is None else total + w * loss
        loss_dict.update({f"{route}/{k}": v for k, v in terms.items()})
    if total is None:
        first = next(iter(predictions_per_route.values()))
        total = _get(first, "pred_logits", "").new_zeros(())
    return total, loss_dict
