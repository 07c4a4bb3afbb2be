"""Layers: deformable attention, instructive self-attention, multi-route decoder."""

from .ms_deform_attn import MultiScaleDeformableAttention

__all__ = ["MultiScaleDeformableAttention"]
