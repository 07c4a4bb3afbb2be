"""``wrap`` / ``unwrap`` / ``route_outputs``: Mr. DETR's training routes on a decoder you have.

A training call of a wrapped decoder returns the primary route's outputs where the decoder
returned them; the integration returns every route's :class:`RouteOutputs` next to them, and
the call leaves those in a per-thread store keyed by the decoder, until :func:`route_outputs`
takes them. Two wrapped models (or two replicas of one, as ``nn.DataParallel`` runs them)
training in two threads at once each get their own outputs; nothing of a pass is stored on the
modules or on the (shared) integration.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import routes as routes_lib
from ..routes import Route
from ..routing import RoutePlan
from . import route_store
from .detector_loss import DetectorLoss, check_route_weights
from .hf.base import is_hf
from .integration import Integration, RouteOutputs, registered_integrations
from .spec import DecoderSpec, SpecIntegration

__all__ = ["wrap", "unwrap", "route_outputs", "is_wrapped"]

_EXAMPLE = (
    'DecoderSpec(decoder="transformer.decoder", layers="layers", self_attn="self_attn", '
    'self_attn_norm="norm1", ffn=("linear1", "linear2"), '
    'query_inputs={"tgt": 1})'
)


class _TrainForward:
    """The wrapped decoder's ``forward``: the original in eval, every route packed in train."""

    def __init__(self, decoder: nn.Module, previous) -> None:
        self.decoder, self.previous = decoder, previous

    def original(self):
        """The forward the decoder had before :func:`wrap`."""
        return self.previous or type(self.decoder).forward.__get__(self.decoder)

    def __call__(self, *args, **kwargs):
        d = self.decoder
        if not d.training:  # the class's function, not a bound method torch.compile may remap
            if self.previous is not None:
                return self.previous(*args, **kwargs)
            return type(d).forward(d, *args, **kwargs)
        _refuse_checkpointing(d)
        return _eager()(self, args, kwargs)


def _packed_pass(wrapper: _TrainForward, args, kwargs):
    decoder = wrapper.decoder
    state = decoder.mrdetr_routes
    primary, outputs = state.integration.train_forward(
        decoder, state, wrapper.original(), args, kwargs
    )
    route_store.put(decoder, outputs)
    return primary


@functools.cache
def _eager():
    """The training pass, run eagerly under ``torch.compile`` (it swaps module forwards for its
    duration, which a compiled graph cannot replay); ``eval()`` compiles as usual. Made on first
    use: ``torch.compiler.disable`` imports ``torch._dynamo``, which ``import mrdetr`` avoids."""
    return torch.compiler.disable(_packed_pass)


def _checkpointing(module: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


_CHECKPOINTING = (
    "gradient checkpointing is not supported on a decoder wrapped by mrdetr: a checkpointed "
    "layer would recompute the primary route alone in backward (the packed routes swap the "
    "layers' modules for the forward only), giving wrong gradients or a CheckpointError. "
)


def _refuse_checkpointing(decoder: nn.Module) -> None:
    if _checkpointing(decoder):
        raise RuntimeError(
            _CHECKPOINTING + "Call model.gradient_checkpointing_disable() before training the "
            "wrapped model (checkpointing the backbone or encoder yourself is fine)"
        )
    _refuse_layerdrop(decoder, RuntimeError)


def _refuse_layerdrop(decoder: nn.Module, error: type[Exception]) -> None:
    """HF decoders skip whole layers at random in training when ``decoder.layerdrop > 0``
    (``config.decoder_layerdrop``): the routes' per-layer outputs would no longer line up with
    the model's own, so it is refused instead of giving wrong losses or an ``IndexError``."""
    p = getattr(decoder, "layerdrop", 0.0)
    if isinstance(p, (int, float)) and p > 0:
        raise error(
            f"decoder layerdrop is not supported on a decoder wrapped by mrdetr: "
            f"{type(decoder).__name__}.layerdrop = {p} skips whole decoder layers at random, "
            "and the routes' per-layer outputs would no longer match the model's. Set "
            "decoder.layerdrop = 0.0 (config.decoder_layerdrop = 0.0 before building the model)"
        )


def _decoders(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), _TrainForward)]


def is_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` is, or holds, a decoder wrapped by :func:`wrap`."""
    return bool(_decoders(model))


def _find(model: nn.Module, spec: DecoderSpec | None) -> tuple[nn.Module, Integration]:
    if spec is not None:
        integration = SpecIntegration(spec)
        return integration.find_decoder(model), integration
    for integration in registered_integrations():
        decoder = integration.find_decoder(model)
        if decoder is not None:
            return decoder, integration
    looked = ", ".join(i.name for i in registered_integrations())
    raise TypeError(
        f"wrap: no decoder recognised in {type(model).__name__}; looked for {looked} (the module "
        f"itself or one inside it). Point the adapter at your decoder with an explicit spec: "
        f"wrap(model, spec=mrdetr.adapters.{_EXAMPLE}), naming where the layers are and, in each "
        "layer, the self-attention, its norm, the FFN (or its linears) and its norm"
    )


def wrap(
    model: nn.Module,
    routes: Sequence[Route] | None = None,
    *,
    spec: DecoderSpec | None = None,
    route_weights: Mapping[str, float] | None = None,
) -> nn.Module:
    """Add Mr. DETR's auxiliary training routes to ``model``'s decoder, in place.

    Args:
        model: a whole detector or a bare decoder of a supported family (see
            ``mrdetr.adapters.registered_integrations()``), or any module with ``spec``.
        routes: the route set, primary first; None means ``routes.mr_detr()``.
        spec: where the decoder's sub-modules are, for a decoder no integration recognises.
        route_weights: weight of each auxiliary route's loss when a whole HF detector is called
            in ``train()`` with ``labels`` (default 1.0 each, as in the paper; 0 leaves the route
            out of the loss: with every weight 0 the loss is the unwrapped model's). Only for
            HF detectors; other models train the routes with ``MultiRouteCriterion``.

    Returns:
        ``model`` itself. In ``train()`` its decoder runs every route packed and returns the
        primary route's outputs where it returned them (the other routes':
        :func:`route_outputs`); in ``eval()`` it runs the original code only. The parameters the
        routes add (owned FFN / self-attention copies initialised from the primary's, norms,
        instruction tokens ~ N(0, 1)) are in ``model.parameters()``. A wrapped HF detector
        called in ``train()`` with ``labels`` returns ``loss`` / ``loss_dict`` with every
        auxiliary route's loss added, computed by the family's own loss function with
        mrdetr's one-to-many matcher (:mod:`mrdetr.adapters.detector_loss`).

    Raises:
        TypeError: no decoder recognised (the message shows the spec to pass); ``routes`` not a
            sequence of :class:`~mrdetr.routes.Route`.
        ValueError: a route set this family cannot run, the decoder is already wrapped, bad
            ``route_weights``, gradient checkpointing is on or the decoder drops layers at
            random (``layerdrop > 0``): neither is supported (see ``docs/integrations.md``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = RoutePlan(routes_lib.mr_detr() if routes is None else routes)
    decoder, integration = _find(model, spec)
    if "mrdetr_routes" in decoder._modules or isinstance(
        decoder.__dict__.get("forward"), _TrainForward
    ):
        raise ValueError("model: its decoder is already wrapped; unwrap(model) first")
    integration.check_routes(decoder, plan)
    detector = _detector(model, integration)
    weights = check_route_weights(route_weights, plan.routes)
    if route_weights is not None and detector is None:
        raise ValueError(
            f"route_weights: only a whole HF detector computes the routes' losses in its forward; "
            f"{type(model).__name__} is not one (train the routes with MultiRouteCriterion, "
            "which takes route_weights)"
        )
    if _checkpointing(decoder):
        raise ValueError(_CHECKPOINTING + "Call model.gradient_checkpointing_disable() first")
    _refuse_layerdrop(decoder, ValueError)
    with torch.inference_mode(False):  # parameters made under inference_mode would be unusable
        state = integration.attach(decoder, plan)
    decoder.mrdetr_routes = state
    decoder.forward = _TrainForward(decoder, decoder.__dict__.get("forward"))
    if detector is not None:
        previous = detector.__dict__.get("forward")
        detector.forward = DetectorLoss(detector, decoder, previous, weights)
    return model


def _detector(model: nn.Module, integration: Integration) -> nn.Module | None:
    """The HF detector (``integration.detector_class``) that is or holds the decoder, or None."""
    name = getattr(integration, "detector_class", "")
    found = [m for m in model.modules() if name and is_hf(m, name)]
    return found[0] if len(found) == 1 else None


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the routes added by :func:`wrap`, in place; returns ``model``.

    Afterwards ``model.state_dict()`` has exactly the keys it had before ``wrap`` (the shared
    parameters keep their trained values) and its forward is the original one.

    Raises:
        ValueError: nothing in ``model`` is wrapped.
    """
    decoders = _decoders(model)
    if not decoders:
        raise ValueError(f"model: no wrapped decoder in {type(model).__name__}")
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), DetectorLoss):
            loss_fwd = m.__dict__.pop("forward")
            if loss_fwd.previous is not None:
                m.forward = loss_fwd.previous
    for decoder in decoders:
        fwd = decoder.__dict__.pop("forward")
        if fwd.previous is not None:
            decoder.forward = fwd.previous
        state = decoder.mrdetr_routes
        del decoder.mrdetr_routes
        state.integration.detach(decoder, state)
        route_store.drop(decoder)
    return model


def route_outputs(model: nn.Module) -> RouteOutputs:
    """Take the :class:`RouteOutputs` of the last training pass of ``model``'s wrapped decoder
    in this thread.

    Call it once after each training forward, in the thread that ran it (it is cleared when
    taken, so no graph outlives the step; it is not part of the model, so it is never
    deep-copied or pickled with it).

    Raises:
        ValueError: nothing is wrapped, or no training pass ran since the last call.
    """
    decoders = _decoders(model)
    if len(decoders) != 1:
        raise ValueError(f"model: expected one wrapped decoder, found {len(decoders)}")
    out = route_store.take(decoders[0])
    if out is None:
        raise ValueError(
            "route_outputs: no training pass since the last call (in eval() only the primary "
            "route runs)"
        )
    return out
