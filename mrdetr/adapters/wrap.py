"""``wrap`` / ``unwrap`` / ``route_outputs``: Mr. DETR's training routes on a decoder you have.

A training call of a wrapped decoder returns the primary route's outputs where the decoder
returned them; the integration returns every route's :class:`RouteOutputs` next to them, and
the call leaves those in a per-thread store keyed by the decoder, until :func:`route_outputs`
takes them. Two wrapped models (or two replicas of one, as ``nn.DataParallel`` runs them)
training in two threads at once each get their own outputs; nothing of a pass is stored on the
modules or on the (shared) integration.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .. import routes as routes_lib
from ..routes import Route
from ..routing import RoutePlan
from .integration import Integration, RouteOutputs, registered_integrations
from .spec import DecoderSpec, SpecIntegration

__all__ = ["wrap", "unwrap", "route_outputs", "is_wrapped"]

_EXAMPLE = (
    'DecoderSpec(decoder="transformer.decoder", layers="layers", self_attn="self_attn", '
    'self_attn_norm="norm1", ffn=("linear1", "linear2"), ffn_norm="norm3", '
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
        return _packed_pass(self, args, kwargs)


@torch.compiler.disable
def _packed_pass(wrapper: _TrainForward, args, kwargs):
    """The training pass, run eagerly under ``torch.compile`` (it swaps module forwards for its
    duration, which a compiled graph cannot replay); ``eval()`` compiles as usual."""
    decoder = wrapper.decoder
    state = decoder.mrdetr_routes
    primary, outputs = state.integration.train_forward(
        decoder, state, wrapper.original(), args, kwargs
    )
    _STORE.outputs[decoder] = outputs
    return primary


class _PassStore(threading.local):
    """Per thread: wrapped decoder -> :class:`RouteOutputs` of its last training call."""

    def __init__(self) -> None:
        self.outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_STORE = _PassStore()


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
) -> nn.Module:
    """Add Mr. DETR's auxiliary training routes to ``model``'s decoder, in place.

    Args:
        model: a whole detector or a bare decoder of a supported family (see
            ``mrdetr.adapters.registered_integrations()``), or any module with ``spec``.
        routes: the route set, primary first; None means ``routes.mr_detr()``.
        spec: where the decoder's sub-modules are, for a decoder no integration recognises.

    Returns:
        ``model`` itself. In ``train()`` its decoder runs every route packed and returns the
        primary route's outputs where it returned them (the other routes':
        :func:`route_outputs`); in ``eval()`` it runs the original code only. The parameters the
        routes add (owned FFN / self-attention copies initialised from the primary's, norms,
        instruction tokens ~ N(0, 1)) are in ``model.parameters()``.

    Raises:
        TypeError: no decoder recognised (the message shows the spec to pass).
        ValueError: a route set this family cannot run, or the decoder is already wrapped.
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
    state = integration.attach(decoder, plan)
    decoder.mrdetr_routes = state
    decoder.forward = _TrainForward(decoder, decoder.__dict__.get("forward"))
    return model


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
    for decoder in decoders:
        fwd = decoder.__dict__.pop("forward")
        if fwd.previous is not None:
            decoder.forward = fwd.previous
        state = decoder.mrdetr_routes
        del decoder.mrdetr_routes
        state.integration.detach(decoder, state)
        _STORE.outputs.pop(decoder, None)
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
    out = _STORE.outputs.pop(decoders[0], None)
    if out is None:
        raise ValueError(
            "route_outputs: no training pass since the last call (in eval() only the primary "
            "route runs)"
        )
    return out
