"""Integration: mrdetr's own single-route ``MultiRouteDecoder`` (``routes.baseline()``).

Our decoder already packs routes on a leading route axis, so wrapping it adds the auxiliary
routes to every layer (:meth:`~mrdetr.layers.MultiRouteDecoderLayer.add_routes`: owned modules
copied from the primary's, under ``layers.<i>.aux.<route>.``, exactly the keys of a decoder built
with those routes). In training the wrapped decoder expands ``query``, ``query_pos`` and
``reference_points`` from one route (``[1, B, Q, ...]``) to all of them and returns the primary
route's slice of :class:`~mrdetr.layers.MultiRouteDecoderOutput`; every route's hidden states,
reference points and refined boxes go to :class:`~mrdetr.adapters.RouteOutputs` (an auxiliary
route's own slice, with its ``balance_losses``, in ``RouteOutputs.outputs``).
``unwrap`` strips the auxiliary modules (``strip_auxiliary``).
"""

from __future__ import annotations

import inspect

from torch import nn

from ..layers import MultiRouteDecoder, MultiRouteDecoderOutput
from ..routing import RoutePlan
from .integration import Integration, RouteOutputs
from .route_modules import RouteModules

__all__ = ["MultiRouteDecoderIntegration"]

_SIG = inspect.signature(MultiRouteDecoder.forward)


def _route_slice(out: MultiRouteDecoderOutput, i: int, name: str) -> MultiRouteDecoderOutput:
    """Route ``i`` (named ``name``) of every field, keeping the route axis
    (``[N, 1, B, Q, ...]``); its balance loss, if it has one."""
    tensors = (None if t is None else t[:, i : i + 1] for t in out[:3])
    balance = {k: v for k, v in out.balance_losses.items() if k == name}
    return MultiRouteDecoderOutput(*tensors, balance)


class MultiRouteDecoderIntegration(Integration):
    """:class:`~mrdetr.layers.MultiRouteDecoder` built with ``routes.baseline()``."""

    name = "mrdetr.MultiRouteDecoder"

    def find_decoder(self, model: nn.Module) -> nn.Module | None:
        found = [m for m in model.modules() if isinstance(m, MultiRouteDecoder)]
        if len(found) > 1:
            raise ValueError(f"model holds {len(found)} MultiRouteDecoder modules: pass one")
        return found[0] if found else None

    def check_routes(self, decoder, plan: RoutePlan) -> None:
        if len(decoder.routes) != 1:
            raise ValueError(
                "model: wrap a MultiRouteDecoder built with routes.baseline(); this one already "
                f"trains routes {[r.name for r in decoder.routes]}"
            )
        if plan.routes[0] != decoder.routes[0]:
            raise ValueError(
                f"routes[0] must be the decoder's primary route {decoder.routes[0]}, "
                f"got {plan.routes[0]}"
            )

    def attach(self, decoder, plan: RoutePlan) -> RouteModules:
        for layer in decoder.layers:
            layer.add_routes(plan.routes)
        return RouteModules(plan, [], self)

    def detach(self, decoder, state) -> None:
        decoder.strip_auxiliary()

    def train_forward(self, decoder, state, forward, args, kwargs):
        bound = _SIG.bind(decoder, *args, **kwargs)
        a, r = bound.arguments, len(state.plan)
        for name in ("query", "reference_points", "query_pos"):
            t = a.get(name)
            if t is not None and t.dim() > 0 and t.shape[0] == 1:
                a[name] = t.expand(r, *t.shape[1:])
        out = forward(*bound.args[1:], **bound.kwargs)
        names = [route.name for route in state.routes]
        aux = {name: _route_slice(out, i, name) for i, name in enumerate(names) if i > 0}
        outputs = RouteOutputs(
            state.routes, out.hidden_states, aux, out.reference_points, out.boxes
        )
        return _route_slice(out, 0, names[0]), outputs
