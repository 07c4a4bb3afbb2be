"""The one builder of the modules an auxiliary route owns in a layer (:class:`OwnedModules`).

Which sub-layers a route owns is the :class:`~mrdetr.routing.plan.RoutePlan`'s decision; this
module turns it into modules, the same way for mrdetr's own layer and for every host decoder:

- a caller lists the :class:`Part` s a route can own in its layers (attribute name, the
  sub-layer of the plan it belongs to, how to make it: a fresh module from the layer's
  configuration in :class:`~mrdetr.layers.MultiRouteDecoderLayer`, a copy of the host's module
  in the adapters);
- :class:`OwnedModules` creates exactly the parts the plan says the route owns, in the listed
  order, as attributes (so ``state_dict`` keys are ``<attribute>.<...>``);
- :meth:`OwnedModules.copy_from` initialises them from the primary route's modules (a new kind
  of owned module is one more :class:`Part`, nothing else).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..routes import Route
from .plan import RoutePlan

__all__ = ["OwnedModules", "Part"]


class Part(NamedTuple):
    """One module (or parameter) a route can own in a layer.

    Attributes:
        name: attribute name on :class:`OwnedModules` (and its ``state_dict`` prefix).
        sublayer: the plan's sub-layer (``"self_attn"``, ``"self_attn_norm"``,
            ``"cross_attn"``, ``"ffn"``) that decides whether the route owns it.
        make: ``route -> nn.Module | nn.Parameter | None``; None: this route needs no such part
            even though it owns the sub-layer (e.g. instruction tokens of a route without any).
    """

    name: str
    sublayer: str
    make: Callable[[Route], nn.Module | nn.Parameter | None]


class OwnedModules(nn.Module):
    """The parts one auxiliary route owns in one layer (an attribute absent means shared).

    Args:
        plan: the route plan (decides ownership).
        route: the auxiliary route.
        parts: every part a route can own in this kind of layer, in creation order.

    Attributes:
        parts: names of the parts created, in order.
    """

    def __init__(self, plan: RoutePlan, route: Route, parts: Sequence[Part]) -> None:
        super().__init__()
        created = []
        for part in parts:
            if plan.owns(route, part.sublayer):
                made = part.make(route)
                if made is not None:
                    setattr(self, part.name, made)
                    created.append(part.name)
        self.parts: tuple[str, ...] = tuple(created)

    def __len__(self) -> int:
        return len(self.parts)

    @torch.no_grad()
    def copy_from(self, primary: Mapping[str, nn.Module | None]) -> None:
        """Initialise every part from the primary route's module of the same name.

        A parameter (instruction tokens) is drawn ~ N(0, 1). A module with a
        ``copy_primary(module)`` method does its own copy; a module of the primary's type
        (or an ``nn.ModuleList`` of them) loads the primary's weights; any other module (a
        mixture of experts in place of a plain FFN) keeps its own initialisation.
        """
        for name in self.parts:
            own, src = getattr(self, name), primary.get(name)
            if isinstance(own, nn.Parameter):
                nn.init.normal_(own)
            elif src is None:
                continue
            elif hasattr(own, "copy_primary"):
                own.copy_primary(src)
            elif type(own) is type(src):
                own.load_state_dict(src.state_dict())
