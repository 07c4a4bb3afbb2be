"""``MultiRouteDecoderLayer``: one Deformable-DETR decoder layer that trains several routes at once.

Routes are a leading tensor axis ``[R, B, Q, C]`` (:class:`~mrdetr.routing.RouteStack`). Routes
that share a sub-layer are packed into one call of it (:func:`~mrdetr.routing.dispatch` over the
packs of the layer's :class:`~mrdetr.routing.RoutePlan`): the shared self-attention runs over
``[R' * B, Q, C]`` (routes never see each other), the shared deformable cross-attention over
``[B, R' * Q, C]`` (so the encoder memory's value projection is computed once), the shared FFN
over the routes that do not own one. Only the routes present in the input run: ``R = 1`` (and
eval mode, unless eval routes were chosen) runs the primary route alone, which touches no
auxiliary module.

Parameter layout: the primary route's modules are ``self_attn``, ``norm1`` (after
self-attention), ``cross_attn``, ``norm2``, ``ffn``, ``norm3``; everything an auxiliary route owns
lives under ``aux.<route name>.`` (:class:`~mrdetr.routing.OwnedModules` with the parts
``self_attn``, ``norm1``, ``cross_attn``, ``ffn``), so
:meth:`MultiRouteDecoderLayer.strip_auxiliary` only has to drop ``aux``.
"""

from __future__ import annotations

from collections.abc import Sequence

from einops import rearrange
from torch import Tensor, nn

from .. import routes as routes_lib
from ..routes import Route
from ..routing import OwnedModules, RoutePlan, RouteStack, check_attn_mask, dispatch
from ..routing import eval_prefix as _eval_prefix
from .ffn import FFN
from .instructive_attention import InstructiveSelfAttention, MultiHeadSelfAttention
from .layer_parts import check_layer_inputs, owned_parts, reset_children
from .moe import MoEFFN
from .ms_deform_attn import MultiScaleDeformableAttention, check_levels

__all__ = ["MultiRouteDecoderLayer"]

_MR_DETR = routes_lib.mr_detr()  # a tuple of frozen dataclasses: a safe default argument


class MultiRouteDecoderLayer(nn.Module):
    """Post-norm deformable decoder layer with Mr. DETR's training routes.

    Order (Deformable-DETR): self-attention (+ residual, LayerNorm) -> deformable cross-attention
    (+ residual, LayerNorm) -> FFN (+ residual, LayerNorm). Dropout is applied to the attention
    probabilities, after each sub-layer and inside the FFN.

    Args:
        embed_dim: channels ``C``.
        num_heads: heads of both attentions.
        ffn_dim: FFN hidden channels.
        num_levels, num_points: deformable attention levels and points per level.
        dropout: dropout probability.
        activation: FFN activation (``"relu"``, ``"gelu"``, ``"glu"``).
        routes: the route set (:mod:`mrdetr.routes`), primary first; default
            ``routes.mr_detr()`` (None also means that).
        backend: ``ms_deform_attn`` backend of the cross-attention.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.1,
        activation: str = "relu",
        routes: Sequence[Route] = _MR_DETR,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.plan = RoutePlan(_MR_DETR if routes is None else routes)
        self._cfg = cfg = dict(
            embed_dim=embed_dim,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            num_levels=num_levels,
            num_points=num_points,
            dropout=dropout,
            activation=activation,
            backend=backend,
        )
        self.embed_dim, self.num_levels = embed_dim, num_levels
        self.self_attn = MultiHeadSelfAttention(embed_dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dim, num_heads, num_levels, num_points, backend=backend
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim, ffn_dim, dropout, activation)
        self.norm3 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        parts = owned_parts(cfg)
        self.aux = nn.ModuleDict(
            {r.name: OwnedModules(self.plan, r, parts) for r in self.routes[1:]}
        )
        self.eval_routes: tuple[str, ...] = ()

    @property
    def routes(self) -> tuple[Route, ...]:
        """The route set, primary first (``self.plan.routes``)."""
        return self.plan.routes

    @property
    def num_routes(self) -> int:
        """Number of routes this layer trains (``len(self.routes)``)."""
        return len(self.routes)

    def reset_parameters(self) -> None:
        """Re-initialise every sub-module with its own scheme (e.g. Deformable-DETR's offsets)."""
        reset_children(self)

    def strip_auxiliary(self) -> MultiRouteDecoderLayer:
        """Drop every auxiliary route and its parameters, in place; returns ``self``.

        Afterwards the layer is the primary route alone; its state dict loads into a
        ``MultiRouteDecoderLayer`` built with ``routes=routes.baseline()``.
        """
        self.aux = nn.ModuleDict()
        self.plan = RoutePlan(self.routes[:1])
        self.eval_routes = ()
        return self

    def add_routes(self, routes: Sequence[Route]) -> MultiRouteDecoderLayer:
        """Switch to the route set ``routes`` (same primary route), in place; returns ``self``.

        Auxiliary modules are created for the routes not present yet: owned FFN, self- and
        cross-attention copies are initialised from the primary route's weights, an instruction
        route's own norm from the primary's ``norm1``, instruction tokens ~ N(0, 1). Modules of
        routes that are no longer in the set are dropped.
        """
        plan = RoutePlan(routes)
        if plan.routes[0] != self.routes[0]:
            raise ValueError(
                f"routes[0] must be this layer's primary route {self.routes[0]}, "
                f"got {plan.routes[0]}"
            )
        aux, parts = nn.ModuleDict(), owned_parts(self._cfg)
        primary = {"self_attn": self.self_attn, "norm1": self.norm1,
                   "cross_attn": self.cross_attn, "ffn": self.ffn}  # fmt: skip
        for r in plan.routes[1:]:
            if r.name in self.aux and r in self.plan.routes:
                aux[r.name] = self.aux[r.name]
                continue
            own = OwnedModules(plan, r, parts)
            own.copy_from(primary)
            aux[r.name] = own.to(self.norm1.weight.device, self.norm1.weight.dtype)
        self.aux, self.plan = aux, plan
        self.eval_routes = tuple(n for n in self.eval_routes if n in aux)
        return self

    def set_eval_routes(self, names: Sequence[str] = ()) -> MultiRouteDecoderLayer:
        """Choose auxiliary routes that also run in eval mode (default: none, the primary alone).

        Eval then runs routes ``0 .. k`` (``k``: the last chosen route; routes in between run
        too, since routes are a prefix of the route axis), so the output holds
        :attr:`num_eval_routes` routes, named by :attr:`eval_route_names`. Training is
        unaffected. Returns ``self``.

        Raises:
            ValueError: a name is not one of this layer's auxiliary routes.
        """
        if isinstance(names, str):
            names = (names,)
        aux = [r.name for r in self.routes[1:]]
        unknown = [n for n in names if n not in aux]
        if unknown:
            raise ValueError(f"eval routes must be auxiliary routes {aux}, got {unknown}")
        self.eval_routes = tuple(n for n in aux if n in names)
        return self

    @property
    def num_eval_routes(self) -> int:
        """Routes run in eval mode: 1 + the index of the last route of :attr:`eval_routes`."""
        names = [r.name for r in self.routes]
        return 1 + max((names.index(n) for n in getattr(self, "eval_routes", ())), default=0)

    @property
    def eval_route_names(self) -> tuple[str, ...]:
        """Names of the routes an eval-mode forward returns, in order (primary first)."""
        return tuple(r.name for r in self.routes[: self.num_eval_routes])

    def forward(
        self,
        query: Tensor,
        *,
        query_pos: Tensor | None,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        num_denoising: int = 0,
        return_balance_losses: bool = False,
        spatial_shapes_list: list[tuple[int, int]] | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Run the routes present in ``query`` (``R`` = all routes, or 1 = the primary alone).

        Args:
            query (Tensor[R, B, Q, C]): object queries of every route, primary first.
            query_pos (Tensor[R, B, Q, C] or None): their positional embeddings.
            reference_points (Tensor[R, B, Q, L, 2 or 4]): per route, already scaled by the
                valid ratios (``[R, B, Q, 2 or 4]`` is used for every level).
            value (Tensor[B, S, C]): encoder memory, shared by the routes.
            spatial_shapes (Tensor[L, 2], int64), level_start_index (Tensor[L], int64).
            key_padding_mask (Tensor[B, S], bool, optional): True at padded memory positions.
            self_attn_mask (Tensor[Q, Q], bool or float, optional): bool True blocks (float is
                added to the logits; integer dtypes raise ``TypeError``); the same for every
                route.
            num_denoising: leading denoising queries (DINO); they never see instruction tokens.
            spatial_shapes_list: ``spatial_shapes`` as host ``(h, w)`` integers; given, the
                deformable attention reads nothing from the device (see
                :func:`mrdetr.ops.ms_deform_attn`).
            return_balance_losses: also return the load-balancing losses
                ``{route name: Tensor[]}`` of this call's mixture-of-experts FFNs (routes that
                ran; ``{}`` without).

        Returns:
            Tensor[R, B, Q, C]. In eval mode only the primary route runs and the output is
            ``[1, B, Q, C]`` (extra input routes are ignored), unless :meth:`set_eval_routes`
            chose auxiliary routes: then ``[num_eval_routes, B, Q, C]``. With
            ``return_balance_losses``: ``(that tensor, balance losses)``.
        """
        check_layer_inputs(self, query, query_pos, reference_points, value)
        check_levels(spatial_shapes, level_start_index, self.num_levels)
        check_attn_mask(self_attn_mask, query.shape[2], query, "self_attn_mask")
        query, reference_points, query_pos = _eval_prefix(
            self.training, self.num_eval_routes, query, reference_points, query_pos
        )
        routes = self.routes[: query.shape[0]]
        x = self._self_attention(query, query_pos, routes, self_attn_mask, num_denoising)
        qp = x if query_pos is None else x + query_pos
        levels = (spatial_shapes, level_start_index, spatial_shapes_list)
        ca = self._cross_attention(qp, reference_points, routes, value, levels, key_padding_mask)
        x = self.norm2(x + self.dropout(ca))
        balance: dict[str, Tensor] = {}
        out = self.norm3(x + self.dropout(self._ffn(x, routes, balance)))
        return (out, balance) if return_balance_losses else out

    def _self_attention(self, query, query_pos, routes, mask, num_denoising) -> Tensor:
        """Self-attention + residual + LayerNorm per pack of routes; [R, B, Q, C]."""

        def run(pack, q, pos):
            if pack.owner is None:
                fold = "r b q c -> (r b) q c"
                y = self.self_attn.attend(
                    rearrange(q, fold),
                    None if pos is None else rearrange(pos, fold),
                    attn_mask=mask,
                    num_denoising=num_denoising,
                )[0]
                return self.norm1(q + self.dropout(y.view(q.shape)))  # [R', B, Q, C]
            aux = self.aux[pack.owner]
            p0 = None if pos is None else pos[0]
            if isinstance(aux.self_attn, InstructiveSelfAttention):
                y = aux.self_attn(
                    q[0],
                    p0,
                    attn_mask=mask,
                    num_denoising=num_denoising,
                    projections=aux.self_attn.attn or self.self_attn,
                )
            else:
                y = aux.self_attn.attend(q[0], p0, attn_mask=mask)[0]
            own_norm = self.plan.owns(routes[pack.routes[0]], "self_attn_norm")
            return (aux.norm1 if own_norm else self.norm1)(q[0] + self.dropout(y))[None]

        packs = self.plan.packs("self_attn", len(routes))
        return dispatch(RouteStack(len(routes)), packs, run, query, query_pos)

    def _cross_attention(self, qp, ref, routes, value, levels, kpm) -> Tensor:
        """Deformable cross-attention, one packed call for the routes sharing it; [R, B, Q, C]."""

        def run(pack, q, r):
            attn = self.cross_attn if pack.owner is None else self.aux[pack.owner].cross_attn
            q = rearrange(q, "r b q c -> b (r q) c")
            r = rearrange(r, "r b q ... -> b (r q) ...")
            shapes, start, shapes_list = levels
            y = attn(q, r, value, shapes, start, kpm, spatial_shapes_list=shapes_list)
            return rearrange(y, "b (r q) c -> r b q c", r=len(pack.routes))

        packs = self.plan.packs("cross_attn", len(routes))
        return dispatch(RouteStack(len(routes)), packs, run, qp, ref)

    def _ffn(self, x: Tensor, routes: Sequence[Route], balance: dict) -> Tensor:
        """FFN of every route (shared one over the routes without their own); [R, B, Q, C].
        Mixture-of-experts FFNs add their load-balancing loss to ``balance``."""

        def run(pack, xs):
            ffn = self.ffn if pack.owner is None else self.aux[pack.owner].ffn
            if isinstance(ffn, MoEFFN):
                y, balance[pack.owner] = ffn.forward_with_balance_loss(xs)
                return y
            return ffn(xs)

        return dispatch(RouteStack(len(routes)), self.plan.packs("ffn", len(routes)), run, x)
