"""The wrapped HF detector's ``forward``: its own output, with the auxiliary routes' losses added.

When a wrapped HF detector is called in ``train()`` with ``labels``, transformers computes the
primary route's loss (its own, denoising included); this forward then adds every auxiliary
route's loss, computed by the same family's loss function with mrdetr's one-to-many matcher in
place of its Hungarian matcher (:func:`~mrdetr.adapters.host_loss.host_auxiliary_loss`), weighted
per route: ``loss = host loss + sum_r route_weights[r] * loss_r`` and ``loss_dict`` gains the
routes' terms under ``"{route}/{term}"``. A training loop that calls
``model(pixel_values, labels=labels).loss.backward()`` (an HF ``Trainer`` among them) trains every
route with no change.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping

import torch
from torch import nn

from ..routes import Route
from . import route_store
from .hf.predictions import hf_route_predictions
from .host_loss import host_auxiliary_loss

__all__ = ["DetectorLoss", "check_route_weights"]


def check_route_weights(route_weights, routes: tuple[Route, ...]) -> dict[str, float]:
    """``route_weights`` as a dict over the auxiliary routes (missing ones 1.0, as in the paper:
    every route's loss summed with equal weights).

    Raises:
        TypeError: ``route_weights`` is not a mapping.
        ValueError: a key that is not an auxiliary route's name, or a weight that is not a
            finite number >= 0.
    """
    aux = [r.name for r in routes[1:]]
    if route_weights is None:
        return dict.fromkeys(aux, 1.0)
    if not isinstance(route_weights, Mapping):
        raise TypeError(
            f"route_weights must be a mapping of auxiliary route name to weight, got "
            f"{type(route_weights).__name__}"
        )
    for name, w in route_weights.items():
        if name == routes[0].name:
            raise ValueError(
                f"route_weights: {name!r} is the primary route, whose loss is the model's own; "
                f"weigh only the auxiliary routes {aux}"
            )
        if name not in aux:
            raise ValueError(
                f"route_weights: unknown route {name!r}; the auxiliary routes are {aux}"
            )
        ok = isinstance(w, numbers.Real) and not isinstance(w, bool)
        if not ok or not math.isfinite(float(w)) or float(w) < 0:
            raise ValueError(f"route_weights[{name!r}] must be a finite number >= 0, got {w!r}")
    return {name: float(route_weights.get(name, 1.0)) for name in aux}


class DetectorLoss:
    """The forward of a wrapped HF detector (an instance attribute; :func:`unwrap` removes it).

    In ``eval()``, without ``labels``, or when transformers computed no loss, it returns the
    original forward's output untouched. Otherwise ``loss`` (``Tensor[]``) and ``loss_dict`` of
    that output (a ``ModelOutput``, or the tuple of ``return_dict=False``) include the auxiliary
    routes' losses; the routes' :class:`~mrdetr.adapters.RouteOutputs` stay available to
    :func:`~mrdetr.adapters.route_outputs`.
    """

    def __init__(self, detector: nn.Module, decoder: nn.Module, previous, weights) -> None:
        self.detector, self.decoder, self.previous = detector, decoder, previous
        self.weights = weights
        self.signature = inspect.signature(type(detector).forward)

    def original(self):
        """The forward the detector had before :func:`wrap`."""
        return self.previous or type(self.detector).forward.__get__(self.detector)

    def _labels(self, args, kwargs):
        if "labels" in kwargs:
            return kwargs["labels"]
        try:
            return self.signature.bind(None, *args, **kwargs).arguments.get("labels")
        except TypeError:
            return None

    def __call__(self, *args, **kwargs):
        route_store.drop(self.decoder)  # below, only this call's routes may be found
        out = self.original()(*args, **kwargs)
        labels = self._labels(args, kwargs)
        if not self.detector.training or labels is None or not any(self.weights.values()):
            return out
        as_tuple = isinstance(out, tuple)
        loss = out[0] if as_tuple else getattr(out, "loss", None)
        if not isinstance(loss, torch.Tensor):
            return out
        outputs = route_store.peek(self.decoder)
        if outputs is None:  # the decoder ran in eval, or not at all
            return out
        # the detector's output: Grounding DINO's loss inputs come from its input_ids
        preds = hf_route_predictions(self.detector, outputs, None if as_tuple else out)
        weights = {r: w for r, w in self.weights.items() if w}  # a weight of 0: not computed
        aux = {r: preds[r] for r in weights}
        aux_loss, aux_dict = host_auxiliary_loss(self.detector, aux, labels, weights)
        if as_tuple:
            loss_dict = out[1] if len(out) > 1 and isinstance(out[1], dict) else None
            rest = out[2:] if loss_dict is not None else out[1:]
            head = (loss + aux_loss,) + (({**loss_dict, **aux_dict},) if loss_dict else ())
            return head + tuple(rest)
        out.loss = loss + aux_loss
        if getattr(out, "loss_dict", None) is not None:
            out.loss_dict = {**out.loss_dict, **aux_dict}
        return out
