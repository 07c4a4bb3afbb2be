"""HF transformers DETR families: the shared mechanism (:class:`HFDecoderIntegration`) and one
short file per family saying only what differs (``deformable_detr.py``, ``rt_detr.py``)."""

from .base import HFDecoderIntegration, HFSelfAttentionCall, stack_routes
from .conditional_detr import HFConditionalDetrIntegration
from .d_fine import HFDeimv2Integration, HFDFineIntegration
from .dab_detr import HFDabDetrIntegration
from .deformable_detr import HFDeformableDetrIntegration
from .detr import HFDetrIntegration
from .grounding_dino import HFGroundingDinoIntegration
from .lw_detr import HFLwDetrIntegration, HFRfDetrIntegration
from .omdet_turbo import HFOmDetTurboIntegration
from .predictions import hf_route_predictions
from .rt_detr import HFRTDetrIntegration
from .rt_detr_v2 import HFRTDetrV2Integration

__all__ = [
    "HFDecoderIntegration",
    "HFDeformableDetrIntegration",
    "HFRTDetrIntegration",
    "HFSelfAttentionCall",
    "hf_route_predictions",
    "stack_routes",
    "HFDetrIntegration",
    "HFConditionalDetrIntegration",
    "HFDabDetrIntegration",
    "HFRTDetrV2Integration",
    "HFDFineIntegration",
    "HFDeimv2Integration",
    "HFLwDetrIntegration",
    "HFRfDetrIntegration",
    "HFGroundingDinoIntegration",
    "HFOmDetTurboIntegration",
]
