"""The per-family extension point of the adapter: :class:`Integration` and its registry.

An integration knows one family of host decoders. :func:`~mrdetr.adapters.wrap` asks every
registered integration, in order, for the decoder inside the model it was given
(:meth:`Integration.find_decoder`); the first that answers wraps it. Most families only need
:class:`QueryTilingIntegration`: say where each layer's sub-modules are
(:meth:`~QueryTilingIntegration.layer_modules`), how the self-attention is called
(:meth:`~QueryTilingIntegration.attention_call`), how to tile the decoder's query inputs and how
to split its outputs per route; the packing itself is :mod:`mrdetr.adapters.packing` on
:mod:`mrdetr.routing`. HF transformers families derive from
:class:`~mrdetr.adapters.hf.HFDecoderIntegration` and say only what differs.

Per-pass state belongs to the call: a training call creates a :class:`RoutePass`, hands it to
every hook and returns what it produced (:class:`RouteOutputs`) with the primary output;
nothing of a pass is kept on an integration (one instance serves every wrapped model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..routes import Route
from ..routing import RouteLayout, RoutePlan, split
from .packing import packed
from .route_modules import LayerModules, RouteModules

__all__ = [
    "Integration",
    "QueryTilingIntegration",
    "RouteOutputs",
    "RoutePass",
    "register_integration",
    "registered_integrations",
]


@dataclass
class RouteOutputs:
    """What a training pass of a wrapped decoder produced besides the primary route's outputs.

    Attributes:
        routes: every route, primary first.
        hidden_states (Tensor[N, R, B, Q, C]): every layer's output per route, batch first,
            matching queries only (denoising queries are left out), the decoder's final norm
            applied when the family has one (DETR's intermediate outputs).
        outputs: per auxiliary route name, what the decoder returns, for that route alone.
        reference_points (Tensor[N, R, B, Q, 2 or 4] or None): the reference each layer
            received (families with reference points).
        boxes (Tensor[N, R, B, Q, 4] or None): every layer's refined boxes (box refinement).
        predictions: the family's own per-layer predictions by name, each ``[N', R, B, Q, ...]``
            (D-FINE / DEIMv2: logits, boxes, corner distributions, initial boxes; empty for
            families whose predictions come from their heads on ``hidden_states``).
        context: what the family's prediction heads need besides the hidden states, the same
            for every route (Grounding DINO: the text features ``[B, T, C]`` and token mask
            ``[B, T]``); empty for most families.
    """

    routes: tuple[Route, ...]
    hidden_states: Tensor
    outputs: dict[str, Any] = field(default_factory=dict)
    reference_points: Tensor | None = None
    boxes: Tensor | None = None
    predictions: dict[str, Tensor] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoutePass:
    """One training call of a wrapped decoder, created by that call and dropped after it.

    Attributes:
        layout: how this call's routes are tiled along the query axis.
        args, kwargs: the decoder's arguments with every query input tiled.
        inputs: the family's values of this call it needs later, by name (e.g. the untiled
            ``reference_points``, whether the caller asked for a tuple).
        hidden: one list per layer, filled with that layer's packed output(s) as it runs.
    """

    layout: RouteLayout
    args: tuple
    kwargs: dict
    inputs: dict[str, Any] = field(default_factory=dict)
    hidden: list[list] = field(default_factory=list)


class Integration:
    """One family of host decoders (subclass it; see the module docstring).

    Attributes:
        name: the family's name, shown in the unknown-decoder error.
    """

    name = "integration"

    def find_decoder(self, model: nn.Module) -> nn.Module | None:
        """The decoder of this family that is ``model`` or inside it, else None."""
        raise NotImplementedError

    def check_routes(self, decoder: nn.Module, plan: RoutePlan) -> None:
        """Raise ``ValueError`` for routes this family cannot run (default: own cross-attention,
        which would need a second memory projection, and mixture-of-experts FFNs)."""
        owners = plan.owners("cross_attn")
        if owners:
            raise ValueError(
                f"routes: {self.name} runs one shared cross-attention over every route; routes "
                f"owning their cross-attention are not supported, got {[r.name for r in owners]}"
            )
        moe = [r.name for r in plan.routes if r.ffn_experts]
        if moe:
            raise ValueError(
                f"routes: {self.name} copies the host's FFN for an owning route; a "
                f"mixture-of-experts FFN (ffn_experts) is not supported here, got {moe}"
            )

    def attach(self, decoder: nn.Module, plan: RoutePlan) -> RouteModules:
        """Create the routes' modules for ``decoder`` (registered as ``decoder.mrdetr_routes``)."""
        raise NotImplementedError

    def detach(self, decoder: nn.Module, state: RouteModules) -> None:
        """Undo whatever :meth:`attach` changed outside ``decoder.mrdetr_routes``."""

    def train_forward(
        self, decoder: nn.Module, state: RouteModules, forward, args, kwargs
    ) -> tuple[Any, RouteOutputs]:
        """A training call: run every route; return ``(primary, route_outputs)``, the primary
        route's outputs as ``forward`` (the original) returns them and :class:`RouteOutputs`."""
        raise NotImplementedError


class QueryTilingIntegration(Integration):
    """Integration whose routes are tiled along the host decoder's query axis."""

    def layer_modules(self, decoder: nn.Module) -> list[LayerModules]:
        """The host modules of every layer."""
        raise NotImplementedError

    def attention_call(self, host: LayerModules):
        """The call convention of ``host.self_attn`` (e.g. :class:`~.packing.MHACall`)."""
        raise NotImplementedError

    def query_dim(self, decoder: nn.Module) -> int:
        """Query axis of the layers' hidden states (1 batch-first, 0 sequence-first)."""
        return 1

    def tile_inputs(self, decoder, args, kwargs, num_routes) -> RoutePass:
        """This call's :class:`RoutePass`: every query input tiled ``[dn ; Q x R]``, the layout,
        and the untiled values the later hooks need in ``inputs``."""
        raise NotImplementedError

    def split_outputs(self, decoder, output, route_pass: RoutePass):
        """``(primary output, {aux route name: output})`` from the packed ``output``."""
        raise NotImplementedError

    def route_geometry(self, decoder, output, route_pass: RoutePass) -> dict[str, Tensor]:
        """``reference_points`` and/or ``boxes`` (``[N, R, B, Q, D]``) of :class:`RouteOutputs`
        from the packed ``output`` (default: none)."""
        return {}

    def layer_hidden(self, decoder: nn.Module, layer_output) -> Tensor:
        """The hidden states in a layer's return value, with the decoder's intermediate norm
        applied where the family has one (default: the value itself)."""
        return layer_output

    def attach(self, decoder: nn.Module, plan: RoutePlan) -> RouteModules:
        return RouteModules(plan, self.layer_modules(decoder), self)

    def train_forward(self, decoder, state, forward, args, kwargs):
        rp = self.tile_inputs(decoder, args, kwargs, len(state.plan))
        with packed(state, rp, self.attention_call):
            output = forward(*rp.args, **rp.kwargs)
        layout = rp.layout
        dim, dn = layout.query_dim, layout.num_denoising
        per_layer = []
        for outs in rp.hidden:
            h = self.layer_hidden(decoder, outs[-1])
            h = h if dim == 1 else h.transpose(0, 1)  # [B, L, C]
            parts = split(h, layout, 1)
            per_layer.append(torch.stack([parts[0][:, dn:], *parts[1:]]))  # [R, B, Q, C]
        primary, aux = self.split_outputs(decoder, output, rp)
        geometry = self.route_geometry(decoder, output, rp)
        return primary, RouteOutputs(state.routes, torch.stack(per_layer), aux, **geometry)


_REGISTRY: list[Integration] = []


def register_integration(integration: Integration, *, first: bool = False) -> Integration:
    """Add a family to the ones :func:`~mrdetr.adapters.wrap` recognises; returns it.

    Args:
        integration: an :class:`Integration` instance.
        first: try it before the registered ones (to override a built-in family).
    """
    if not isinstance(integration, Integration):
        raise TypeError(
            f"integration must be an mrdetr.adapters.Integration, got {type(integration).__name__}"
        )
    _REGISTRY.insert(0, integration) if first else _REGISTRY.append(integration)
    return integration


def registered_integrations() -> tuple[Integration, ...]:
    """The registered families, in the order :func:`~mrdetr.adapters.wrap` tries them."""
    return tuple(_REGISTRY)
