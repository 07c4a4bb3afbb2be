"""The routing engine: which route uses which module, and how packs of routes are run.

- :mod:`~mrdetr.routing.plan`: :class:`RoutePlan`, the route-sharing rule (one :class:`Pack`
  per shared module call);
- :mod:`~mrdetr.routing.layout`: where routes sit in a tensor (:class:`RouteStack`,
  :class:`RouteLayout`) and :func:`dispatch`, the one pack / run / un-pack loop;
- :mod:`~mrdetr.routing.owned`: :class:`OwnedModules`, the one builder of a route's own modules;
- :mod:`~mrdetr.routing.attention`: :class:`AttentionWeights` and :func:`instructive_attend`,
  the one instructive attention.

:mod:`mrdetr.layers` and :mod:`mrdetr.adapters` both build on this package; it imports neither.
"""

from .attention import AttentionWeights, attention_weights, check_attn_mask, instructive_attend
from .layout import RouteLayout, RouteStack, dispatch, eval_prefix, gather, split, tile
from .owned import OwnedModules, Part
from .plan import SUBLAYERS, Pack, RoutePlan

__all__ = [
    "SUBLAYERS",
    "AttentionWeights",
    "OwnedModules",
    "Pack",
    "Part",
    "RouteLayout",
    "RoutePlan",
    "RouteStack",
    "attention_weights",
    "check_attn_mask",
    "dispatch",
    "eval_prefix",
    "gather",
    "instructive_attend",
    "split",
    "tile",
]
