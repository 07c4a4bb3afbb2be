"""Parts of :class:`~mrdetr.layers.MultiRouteDecoderLayer`: what a route can own in it (made
fresh from the layer's configuration, built by :class:`~mrdetr.routing.OwnedModules`), the
re-initialisation walk and the input checks."""

from __future__ import annotations

from torch import nn

from ..routes import Route
from ..routing import Part
from .ffn import FFN
from .instructive_attention import InstructiveSelfAttention, MultiHeadSelfAttention
from .moe import MoEFFN
from .ms_deform_attn import MultiScaleDeformableAttention

__all__ = ["check_layer_inputs", "owned_parts", "reset_children"]


def reset_children(module: nn.Module) -> None:
    """Call ``reset_parameters`` on the outermost sub-modules that define it."""
    for child in module.children():
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()
        else:
            reset_children(child)


def owned_parts(cfg: dict) -> tuple[Part, ...]:
    """What a route can own in this layer, made fresh from the layer's configuration."""
    c, h, drop = cfg["embed_dim"], cfg["num_heads"], cfg["dropout"]

    def self_attn(r: Route) -> nn.Module:
        if r.num_instruction_tokens > 0:
            return InstructiveSelfAttention(
                c, h, r.num_instruction_tokens, drop, own_projections=r.own_self_attn
            )
        return MultiHeadSelfAttention(c, h, drop)

    def ffn(r: Route) -> nn.Module:
        if r.ffn_experts:
            return MoEFFN(c, cfg["ffn_dim"], r.ffn_experts, r.ffn_top_k, drop, cfg["activation"])
        return FFN(c, cfg["ffn_dim"], drop, cfg["activation"])

    return (
        Part("self_attn", "self_attn", self_attn),
        Part("norm1", "self_attn_norm", lambda r: nn.LayerNorm(c)),
        Part(
            "cross_attn",
            "cross_attn",
            lambda r: MultiScaleDeformableAttention(
                c, h, cfg["num_levels"], cfg["num_points"], backend=cfg["backend"]
            ),
        ),  # fmt: skip
        Part("ffn", "ffn", ffn),
    )


def check_layer_inputs(layer, query, query_pos, ref, value) -> None:
    """Shapes of :meth:`MultiRouteDecoderLayer.forward`'s inputs (``ValueError`` naming them)."""
    n, c = len(layer.routes), layer.embed_dim
    if query.dim() != 4 or query.shape[-1] != c:
        raise ValueError(f"query must be [R, B, Q, C={c}], got {tuple(query.shape)}")
    if query.shape[0] not in (1, n, layer.num_eval_routes):
        raise ValueError(
            f"query must hold R=1 (the primary route) or R={n} (all routes: "
            f"{[r.name for r in layer.routes]}) routes, got R={query.shape[0]}"
        )
    if query_pos is not None and query_pos.shape != query.shape:
        raise ValueError(
            f"query_pos must match query {tuple(query.shape)}, got {tuple(query_pos.shape)}"
        )
    lead = tuple(query.shape[:3])
    ok = ref.dim() == 4 or (ref.dim() == 5 and ref.shape[3] == layer.num_levels)
    if not ok or tuple(ref.shape[:3]) != lead or ref.shape[-1] not in (2, 4):
        raise ValueError(
            f"reference_points must be [R, B, Q, L={layer.num_levels}, 2 or 4] with "
            f"[R, B, Q]={lead}, got {tuple(ref.shape)}"
        )
    if value.dim() != 3 or value.shape[0] != query.shape[1] or value.shape[-1] != c:
        raise ValueError(f"value must be [B={query.shape[1]}, S, C={c}], got {tuple(value.shape)}")
