"""``MultiRouteDecoder``: a stack of ``MultiRouteDecoderLayer`` with iterative box refinement."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..routes import Route
from ..routing import check_attn_mask, eval_prefix
from .ms_deform_attn import check_levels
from .multi_route import _MR_DETR, MultiRouteDecoderLayer

__all__ = ["MultiRouteDecoder", "MultiRouteDecoderOutput", "inverse_sigmoid"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[eps, 1 - eps]`` (Deformable-DETR's)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


class MultiRouteDecoderOutput(NamedTuple):
    """Per-layer outputs of :class:`MultiRouteDecoder` (``N`` = layers returned).

    Attributes:
        hidden_states (Tensor[N, R, B, Q, C]): output of every layer (only the last one when
            ``return_intermediate=False``, ``N = 1``).
        reference_points (Tensor[N, R, B, Q, 2 or 4]): the normalised reference points each of
            those layers received, so that layer ``i``'s boxes are
            ``sigmoid(box_head[i](hidden_states[i]) + inverse_sigmoid(reference_points[i]))``.
            Detached, except with ``look_forward_twice``, where entry ``i > 0`` is layer
            ``i - 1``'s undetached refined box (DINO).
        boxes (Tensor[N, R, B, Q, 4] or None): with ``box_heads``, each of those layers'
            predicted boxes, exactly the formula above (so with ``look_forward_twice`` their
            gradient reaches the previous layer's box head); None without ``box_heads``.
        balance_losses (Mapping[str, Tensor[]]): per route with a mixture-of-experts FFN
            (:class:`~mrdetr.layers.MoEFFN`) that ran, its load-balancing loss averaged over
            the layers; give it to ``MultiRouteCriterion`` as that route's ``"loss_moe"``.
            Empty without such routes (and in eval, unless they are eval routes).
    """

    hidden_states: Tensor
    reference_points: Tensor
    boxes: Tensor | None = None
    balance_losses: Mapping[str, Tensor] = MappingProxyType({})  # read-only: shared default


class MultiRouteDecoder(nn.Module):
    """A stack of :class:`MultiRouteDecoderLayer` sharing one route set.

    Args:
        num_layers: decoder layers.
        embed_dim, num_heads, ffn_dim, num_levels, num_points, dropout, activation, routes,
            backend: passed to every :class:`MultiRouteDecoderLayer`.
        return_intermediate: return every layer's output, not only the last.
        look_forward_twice: DINO's refinement: a layer's boxes are predicted from the previous
            layer's undetached refined box, so its loss also trains the previous box head.
    """

    def __init__(
        self,
        num_layers: int = 6,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.1,
        activation: str = "relu",
        routes: Sequence[Route] = _MR_DETR,
        return_intermediate: bool = True,
        look_forward_twice: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        kwargs = dict(
            embed_dim=embed_dim,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            num_levels=num_levels,
            num_points=num_points,
            dropout=dropout,
            activation=activation,
            routes=routes,
            backend=backend,
        )
        self.layers = nn.ModuleList(MultiRouteDecoderLayer(**kwargs) for _ in range(num_layers))
        self.return_intermediate = return_intermediate
        self.look_forward_twice = look_forward_twice

    @property
    def routes(self) -> tuple[Route, ...]:
        """The route set of the layers, primary first."""
        return self.layers[0].routes

    def reset_parameters(self) -> None:
        """Re-initialise every layer."""
        for layer in self.layers:
            layer.reset_parameters()

    def strip_auxiliary(self) -> MultiRouteDecoder:
        """Drop every auxiliary route and parameter of every layer, in place; returns ``self``.

        The result's state dict loads into a ``MultiRouteDecoder`` built with
        ``routes=routes.baseline()``.
        """
        for layer in self.layers:
            layer.strip_auxiliary()
        return self

    def set_eval_routes(self, names: Sequence[str] = ()) -> MultiRouteDecoder:
        """Run the auxiliary routes ``names`` in eval mode too (see
        :meth:`MultiRouteDecoderLayer.set_eval_routes`); ``()`` restores the default (primary
        alone). Returns ``self``."""
        for layer in self.layers:
            layer.set_eval_routes(names)
        return self

    @property
    def eval_route_names(self) -> tuple[str, ...]:
        """Names of the routes an eval-mode forward returns, in order (primary first)."""
        return self.layers[0].eval_route_names

    def forward(
        self,
        query: Tensor,
        *,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor | None = None,
        query_pos: Tensor | None = None,
        query_pos_head: Callable[[Tensor], Tensor] | None = None,
        box_heads: Sequence[Callable[[Tensor], Tensor]] | None = None,
        key_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        num_denoising: int = 0,
        spatial_shapes_list: list[tuple[int, int]] | None = None,
    ) -> MultiRouteDecoderOutput:
        """Decode every route through all layers.

        Args:
            query (Tensor[R, B, Q, C]): initial queries per route (R = all routes or 1).
            reference_points (Tensor[R, B, Q, 2 or 4]): normalised initial points / boxes
                (``(cx, cy, w, h)``); boxes are required with ``box_heads``.
            value (Tensor[B, S, C]): encoder memory.
            spatial_shapes (Tensor[L, 2], int64), level_start_index (Tensor[L], int64).
            valid_ratios (Tensor[B, L, 2], optional): valid fraction ``(w, h)`` of every level;
                None means 1 (no padding).
            query_pos (Tensor[R, B, Q, C], optional): fixed positional embedding.
            query_pos_head (optional): called per layer on the level-0 scaled reference points
                ``Tensor[R, B, Q, 2 or 4]`` to produce ``query_pos`` (DINO style); overrides
                ``query_pos``.
            box_heads (optional): one callable per layer ``Tensor[..., C] -> Tensor[..., 4]``
                (the detector's box heads, not registered here); enables iterative refinement.
            key_padding_mask, self_attn_mask, num_denoising: as
                :meth:`MultiRouteDecoderLayer.forward`.
            spatial_shapes_list: ``spatial_shapes`` as host ``(h, w)`` integers. Without it the
                decoder reads ``spatial_shapes`` once per call (one device-to-host read instead
                of one per layer, forward and backward); under ``torch.compile`` it leaves the
                tensors to the op.

        Returns:
            :class:`MultiRouteDecoderOutput`. In eval mode only the primary route runs (R = 1),
            or the routes :attr:`eval_route_names` after :meth:`set_eval_routes`.
        """
        self._check(query, reference_points, valid_ratios, box_heads)
        check_levels(spatial_shapes, level_start_index, self.layers[0].num_levels)
        check_attn_mask(self_attn_mask, query.shape[2], query, "self_attn_mask")
        query, reference_points, query_pos = eval_prefix(
            self.training, self.layers[0].num_eval_routes, query, reference_points, query_pos
        )
        if spatial_shapes_list is None and not torch.compiler.is_compiling():
            spatial_shapes_list = [tuple(hw) for hw in spatial_shapes.tolist()]
        x, ref, ref_pred = query, reference_points, reference_points
        hidden, refs, boxes, balance = [], [], [], {}
        moe = any(r.ffn_experts for r in self.routes)
        for i, layer in enumerate(self.layers):
            ref_in = ref[:, :, :, None]  # [R, B, Q, 1, D]
            if valid_ratios is not None:
                ratios = valid_ratios if ref.shape[-1] == 2 else valid_ratios.repeat(1, 1, 2)
                ref_in = ref_in * ratios[None, :, None]  # [R, B, Q, L, D]
            else:
                ref_in = ref_in.expand(-1, -1, -1, layer.num_levels, -1)
            pos = query_pos if query_pos_head is None else query_pos_head(ref_in[:, :, :, 0])
            inputs = dict(
                query_pos=pos,
                reference_points=ref_in,
                value=value,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                key_padding_mask=key_padding_mask,
                self_attn_mask=self_attn_mask,
                num_denoising=num_denoising,
                spatial_shapes_list=spatial_shapes_list,
            )
            if moe:  # only then the layer returns a pair (a layer's hooks see what they saw)
                x, layer_balance = layer(x, **inputs, return_balance_losses=True)
            else:
                x, layer_balance = layer(x, **inputs), {}
            for name, loss in layer_balance.items():
                balance.setdefault(name, []).append(loss)
            keep = self.return_intermediate or i == len(self.layers) - 1
            if keep:
                hidden.append(x)
                refs.append(ref_pred)
            if box_heads is not None:
                delta = box_heads[i](x)
                new_ref = (delta + inverse_sigmoid(ref)).sigmoid()
                if keep:  # the loss's box: through the undetached previous box under LFT
                    lft = self.look_forward_twice and ref_pred is not ref
                    boxes.append((delta + inverse_sigmoid(ref_pred)).sigmoid() if lft else new_ref)
                ref = new_ref.detach()  # the next layer always receives a detached box
                ref_pred = new_ref if self.look_forward_twice else ref
            else:
                ref_pred = ref
        stacked = torch.stack(boxes) if boxes else None
        balance = {name: torch.stack(v).mean() for name, v in balance.items()}
        return MultiRouteDecoderOutput(torch.stack(hidden), torch.stack(refs), stacked, balance)

    def _check(self, query, ref, valid_ratios, box_heads) -> None:
        if query.dim() != 4:
            raise ValueError(f"query must be [R, B, Q, C], got {tuple(query.shape)}")
        lead = tuple(query.shape[:3])
        if ref.dim() != 4 or tuple(ref.shape[:3]) != lead or ref.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must be [R, B, Q, 2 or 4] with [R, B, Q]="
                f"{tuple(query.shape[:3])}, got {tuple(ref.shape)}"
            )
        levels = self.layers[0].num_levels
        if valid_ratios is not None and tuple(valid_ratios.shape) != (query.shape[1], levels, 2):
            raise ValueError(
                f"valid_ratios must be [B, L, 2]=({query.shape[1]}, {levels}, 2), "
                f"got {tuple(valid_ratios.shape)}"
            )
        if box_heads is not None:
            if len(box_heads) != len(self.layers):
                raise ValueError(
                    f"box_heads must hold one head per layer ({len(self.layers)}), "
                    f"got {len(box_heads)}"
                )
            if ref.shape[-1] != 4:
                raise ValueError(
                    "box refinement needs box reference points [R, B, Q, 4], "
                    f"got {tuple(ref.shape)}"
                )
