"""The auxiliary routes' own modules of a wrapped decoder, and where the host's sub-modules are.

:class:`LayerModules` names, for one host decoder layer, the modules the route mechanism works
on (the self-attention, the norm after it, the FFN or its linears).
:class:`RouteModules` is registered on the wrapped decoder as ``decoder.mrdetr_routes``: it holds
every parameter the routes add (``aux.<layer>.<route>.``, a
:class:`~mrdetr.routing.OwnedModules` with the parts ``self_attn`` copy, ``tokens`` and
``tokens_pos``, ``self_attn_norm`` copy, ``ffn`` copies) and the route plan; nothing of a pass.
:func:`mrdetr.adapters.unwrap` deletes it, so the host's ``state_dict()`` keys come back
exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ..routes import Route
from ..routing import OwnedModules, Part, RoutePlan, attention_weights

__all__ = ["LayerModules", "RouteModules"]


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
        ffn_norm: optional and unused (the FFN's norm is always shared); accepted so that
            older integrations still construct.
        embed_dim: channels ``C`` of the instruction tokens; None: the query projection's input
            width (a self-attention without plain q/k/v projections must give it).
    """

    layer: nn.Module
    self_attn: nn.Module
    self_attn_norm: nn.Module
    ffn: tuple[nn.Module, ...]
    ffn_norm: nn.Module | None = None
    embed_dim: int | None = None


def _host_parts(host: LayerModules, embed_dim: int) -> tuple[Part, ...]:
    """What a route can own in a host layer: copies of the host's modules, instruction tokens."""

    def tokens(r: Route) -> nn.Parameter | None:
        n = r.num_instruction_tokens
        return nn.Parameter(host.self_attn_norm.weight.new_empty(n, embed_dim)) if n else None

    return (
        Part(
            "self_attn",
            "self_attn",
            lambda r: copy.deepcopy(host.self_attn) if r.own_self_attn else None,
        ),
        Part("tokens", "self_attn", tokens),
        Part("tokens_pos", "self_attn", tokens),
        Part("self_attn_norm", "self_attn_norm", lambda r: copy.deepcopy(host.self_attn_norm)),
        Part("ffn", "ffn", lambda r: nn.ModuleList(copy.deepcopy(m) for m in host.ffn)),
    )


class RouteModules(nn.Module):
    """Route state of a wrapped decoder, registered as ``decoder.mrdetr_routes``.

    Args:
        plan: the route plan (:class:`~mrdetr.routing.RoutePlan`).
        layers: the host's modules per decoder layer (``[]`` for integrations that keep the
            auxiliary modules elsewhere, like mrdetr's own decoder).
        integration: the :class:`~mrdetr.adapters.Integration` that wrapped the decoder.

    Attributes:
        aux (nn.ModuleList of nn.ModuleDict): ``aux[layer][route name]`` ->
            :class:`~mrdetr.routing.OwnedModules`, for the auxiliary routes that own something
            there.
    """

    def __init__(self, plan: RoutePlan, layers: list[LayerModules], integration) -> None:
        super().__init__()
        self.plan, self.integration = plan, integration
        self.host_layers = list(layers)  # plain list: the host's modules stay registered there
        self.aux = nn.ModuleList()
        for host in layers:
            dim = host.embed_dim or attention_weights(host.self_attn).q_weight.shape[1]
            parts = _host_parts(host, dim)
            owned = {r.name: OwnedModules(plan, r, parts) for r in plan.routes[1:]}
            self.aux.append(nn.ModuleDict({n: m for n, m in owned.items() if len(m)}))
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
            primary = {"self_attn": host.self_attn, "self_attn_norm": host.self_attn_norm,
                       "ffn": nn.ModuleList(host.ffn)}  # fmt: skip
            for mods in owned.values():
                mods.copy_from(primary)
