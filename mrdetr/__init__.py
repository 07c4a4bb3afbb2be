"""mrdetr: Mr. DETR (CVPR 2025) instructive multi-route training for any DETR codebase."""

from .layers import MultiScaleDeformableAttention
from .ops import available_backends, ms_deform_attn, ms_deform_attn_reference

__version__ = "0.1.0"

__all__ = [
    "MultiScaleDeformableAttention",
    "available_backends",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]
