"""The auxiliary routes' own modules of a wrapped decoder, and where the host's sub-modules are.

:class:`LayerModules` names, for one host decoder layer, the modules the route mechanism works
on (the self-attention, the norm after it, the FFN or its linears, the FFN's norm).
:class:`RouteModules` is registered on the wrapped decoder as ``decoder.mrdetr_routes``: it holds
every parameter the routes add (``aux.<layer>.<route>.``: ``self_attn`` copy, ``tokens`` and
``tokens_pos``, ``self_attn_norm`` copy, ``ffn`` copies), the route plan, and the side channel
of the last training pass. :func:`mrdetr.adapters.unwrap` deletes it, so the host's
``state_dict()`` keys come back exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.attention_weights import attention_weights
from ..layers.route_plan import RoutePlan
from ..routes import Route

__all__ = ["LayerModules", "RouteModules", "RouteLayerModules"]


@dataclass
class LayerModules:
    """The host modules of one decoder layer that the routes act on (references, not copies).

    Attributes:
        layer: the layer itself (its output is recorded per route).
        self_attn: the self-attention module (its call convention is the integration's).
        self_attn_norm: the LayerNorm after self-attention (before it in pre-norm layers);
            an instruction route owns a copy of it.
        ffn: the FFN as one module, or its linears in order (``linear1, linear2`` / ``fc1,
            fc2``): the activation and dropout between them act element-wise, so applying a
            route's own copy of each linear on its slice equals running its own FFN.
        ffn_norm: the LayerNorm after the FFN (always shared; named for completeness).
    """

    layer: nn.Module
    self_attn: nn.Module
    self_attn_norm: nn.Module
    ffn: tuple[nn.Module, ...]
    ffn_norm: nn.Module


class RouteLayerModules(nn.Module):
    """What one auxiliary route owns in one layer (attributes absent when it shares them).

    ``self_attn`` (copy of the host's, ``own_self_attn``); ``tokens`` and ``tokens_pos``
    (``Tensor[n, C]``, instruction tokens); ``self_attn_norm`` (copy of the host's norm,
    instruction routes); ``ffn`` (``nn.ModuleList`` of copies of the FFN module or linears).
    """

    def __init__(self, plan: RoutePlan, route: Route, host: LayerModules, embed_dim: int):
        super().__init__()
        self.route_name = route.name
        if route.own_self_attn:
            self.self_attn = copy.deepcopy(host.self_attn)
        if route.num_instruction_tokens > 0:
            n = route.num_instruction_tokens
            like = host.self_attn_norm.weight
            self.tokens = nn.Parameter(like.new_empty(n, embed_dim))
            self.tokens_pos = nn.Parameter(like.new_empty(n, embed_dim))
        if plan.owns(route, "self_attn_norm"):
            self.self_attn_norm = copy.deepcopy(host.self_attn_norm)
        if plan.owns(route, "ffn"):
            self.ffn = nn.ModuleList(copy.deepcopy(m) for m in host.ffn)

    def reset_parameters(self, host: LayerModules) -> None:
        """Copy the owned modules' weights from the primary's ``host`` modules; tokens ~ N(0, 1)."""
        with torch.no_grad():
            if hasattr(self, "self_attn"):
                self.self_attn.load_state_dict(host.self_attn.state_dict())
            if hasattr(self, "tokens"):
                nn.init.normal_(self.tokens)
                nn.init.normal_(self.tokens_pos)
            if hasattr(self, "self_attn_norm"):
                self.self_attn_norm.load_state_dict(host.self_attn_norm.state_dict())
            if hasattr(self, "ffn"):
                for own, primary in zip(self.ffn, host.ffn, strict=True):
                    own.load_state_dict(primary.state_dict())


class RouteModules(nn.Module):
    """Route state of a wrapped decoder, registered as ``decoder.mrdetr_routes``.

    Args:
        plan: the route plan (:class:`~mrdetr.layers.route_plan.RoutePlan`).
        layers: the host's modules per decoder layer (``[]`` for integrations that keep the
            auxiliary modules elsewhere, like mrdetr's own decoder).
        integration: the :class:`~mrdetr.adapters.Integration` that wrapped the decoder.

    Attributes:
        aux (nn.ModuleList of nn.ModuleDict): ``aux[layer][route name]`` ->
            :class:`RouteLayerModules`, for the auxiliary routes that own something there.
        last: :class:`~mrdetr.adapters.RouteOutputs` of the last training pass (taken by
            :func:`~mrdetr.adapters.route_outputs`; never copied or pickled).
    """

    def __init__(self, plan: RoutePlan, layers: list[LayerModules], integration) -> None:
        super().__init__()
        self.plan, self.integration = plan, integration
        self.host_layers = list(layers)  # plain list: the host's modules stay registered there
        self.layout = None
        self.last = None
        self.aux = nn.ModuleList()
        for host in layers:
            dim = attention_weights(host.self_attn).q_weight.shape[1]
            owners = {
                r.name: RouteLayerModules(plan, r, host, dim)
                for r in plan.routes[1:]
                if any(plan.owns(r, s) for s in ("self_attn", "self_attn_norm", "ffn"))
            }
            self.aux.append(nn.ModuleDict(owners))
        self.reset_parameters()

    @property
    def routes(self) -> tuple[Route, ...]:
        """The route set, primary first."""
        return self.plan.routes

    def reset_parameters(self) -> None:
        """Re-initialise every module the routes added (copies from the primary, tokens N(0, 1)).

        Call it again after anything that re-initialises the host (``_reset_parameters``,
        ``init_weights``, loading a checkpoint into the host) if the copies should follow.
        """
        for host, owned in zip(self.host_layers, self.aux, strict=True):
            for mods in owned.values():
                mods.reset_parameters(host)

    def __getstate__(self):
        return {**self.__dict__, "last": None, "layout": None}  # no graph tensors in copies
