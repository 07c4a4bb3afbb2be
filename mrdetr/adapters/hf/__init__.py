"""HF transformers DETR families: the shared mechanism (:class:`HFDecoderIntegration`) and one
short file per family saying only what differs (``deformable_detr.py``, ``rt_detr.py``)."""

from .base import HFDecoderIntegration, HFSelfAttentionCall, stack_routes
from .deformable_detr import HFDeformableDetrIntegration
from .grounding_dino import HFGroundingDinoIntegration
from .omdet_turbo import HFOmDetTurboIntegration
from .predictions import hf_route_predictions
from .rt_detr import HFRTDetrIntegration

__all__ = [
    "HFDecoderIntegration",
    "HFDeformableDetrIntegration",
    "HFRTDetrIntegration",
    "HFSelfAttentionCall",
    "hf_route_predictions",
    "stack_routes",
    "HFGroundingDinoIntegration",
    "HFOmDetTurboIntegration",
]
