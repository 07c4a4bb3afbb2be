"""mrdetr: Mr. DETR (CVPR 2025) instructive multi-route training for any DETR codebase."""

from . import boxes, losses
from .criterion import MultiRouteCriterion
from .layers import MultiScaleDeformableAttention
from .matching import HungarianMatcher, OneToManyMatcher, RepeatedGTMatcher, RouteMatcher
from .ops import available_backends, ms_deform_attn, ms_deform_attn_reference

__version__ = "0.1.0"

__all__ = [
    "HungarianMatcher",
    "MultiRouteCriterion",
    "MultiScaleDeformableAttention",
    "OneToManyMatcher",
    "RepeatedGTMatcher",
    "RouteMatcher",
    "available_backends",
    "boxes",
    "losses",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]
