"""The modules one auxiliary route owns in a :class:`~mrdetr.layers.MultiRouteDecoderLayer`."""

from __future__ import annotations

import torch
from torch import nn

from ..routes import Route
from .ffn import FFN
from .instructive_attention import InstructiveSelfAttention, MultiHeadSelfAttention
from .moe import MoEFFN
from .ms_deform_attn import MultiScaleDeformableAttention

__all__ = ["AuxiliaryModules"]


class AuxiliaryModules(nn.Module):
    """The modules one auxiliary route owns (attributes absent when shared)."""

    def __init__(self, route: Route, cfg: dict) -> None:
        super().__init__()
        c, h, drop = cfg["embed_dim"], cfg["num_heads"], cfg["dropout"]
        if route.num_instruction_tokens > 0:
            self.self_attn = InstructiveSelfAttention(
                c, h, route.num_instruction_tokens, drop, own_projections=route.own_self_attn
            )
            self.norm1 = nn.LayerNorm(c)
        elif route.own_self_attn:
            self.self_attn = MultiHeadSelfAttention(c, h, drop)
        if route.own_cross_attn:
            self.cross_attn = MultiScaleDeformableAttention(
                c, h, cfg["num_levels"], cfg["num_points"], backend=cfg["backend"]
            )
        if route.own_ffn and route.ffn_experts:
            self.ffn = MoEFFN(
                c, cfg["ffn_dim"], route.ffn_experts, route.ffn_top_k, drop, cfg["activation"]
            )
        elif route.own_ffn:
            self.ffn = FFN(c, cfg["ffn_dim"], drop, cfg["activation"])

    @classmethod
    def from_primary(cls, route: Route, layer: nn.Module) -> AuxiliaryModules:
        """The modules ``route`` owns in ``layer``, initialised from the primary route's.

        Owned FFN (a plain one; a mixture of experts keeps its own initialisation), self- and
        cross-attention copies take the primary's weights, an instruction route's ``norm1`` the
        primary's ``norm1``; instruction tokens ~ N(0, 1). Same device and dtype as ``layer``.
        """
        mods = cls(route, layer._cfg)
        with torch.no_grad():
            if isinstance(getattr(mods, "ffn", None), FFN):
                mods.ffn.load_state_dict(layer.ffn.state_dict())
            if hasattr(mods, "cross_attn"):
                mods.cross_attn.load_state_dict(layer.cross_attn.state_dict())
            if hasattr(mods, "norm1"):
                mods.norm1.load_state_dict(layer.norm1.state_dict())
            own_sa = getattr(mods, "self_attn", None)
            if isinstance(own_sa, InstructiveSelfAttention):
                own_sa = own_sa.attn
            if own_sa is not None:
                own_sa.load_state_dict(layer.self_attn.state_dict())
        return mods.to(layer.norm1.weight.device, layer.norm1.weight.dtype)
