"""Layers: deformable attention, instructive self-attention, multi-route decoder."""

from .decoder import MultiRouteDecoder, MultiRouteDecoderOutput, inverse_sigmoid
from .ffn import FFN
from .instructive_attention import InstructiveSelfAttention, MultiHeadSelfAttention
from .moe import MoEFFN
from .ms_deform_attn import MultiScaleDeformableAttention
from .multi_route import MultiRouteDecoderLayer

__all__ = [
    "FFN",
    "InstructiveSelfAttention",
    "MoEFFN",
    "MultiHeadSelfAttention",
    "MultiRouteDecoder",
    "MultiRouteDecoderLayer",
    "MultiRouteDecoderOutput",
    "MultiScaleDeformableAttention",
    "inverse_sigmoid",
]
