"""mrdetr: Mr. DETR (CVPR 2025) instructive multi-route training for any DETR codebase."""

from . import boxes, losses, nms, routes, segmentation
from .convert import convert_reference_decoder, convert_reference_layer
from .criterion import MultiRouteCriterion
from .layers import (
    InstructiveSelfAttention,
    MultiHeadSelfAttention,
    MultiRouteDecoder,
    MultiRouteDecoderLayer,
    MultiRouteDecoderOutput,
    MultiScaleDeformableAttention,
)
from .matching import HungarianMatcher, OneToManyMatcher, RepeatedGTMatcher, RouteMatcher
from .ops import available_backends, ms_deform_attn, ms_deform_attn_reference
from .routes import Route

__version__ = "0.1.0"

__all__ = [
    "HungarianMatcher",
    "InstructiveSelfAttention",
    "MultiHeadSelfAttention",
    "MultiRouteCriterion",
    "MultiRouteDecoder",
    "MultiRouteDecoderLayer",
    "MultiRouteDecoderOutput",
    "MultiScaleDeformableAttention",
    "OneToManyMatcher",
    "RepeatedGTMatcher",
    "Route",
    "RouteMatcher",
    "available_backends",
    "boxes",
    "convert_reference_decoder",
    "convert_reference_layer",
    "losses",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "nms",
    "routes",
    "segmentation",
]
