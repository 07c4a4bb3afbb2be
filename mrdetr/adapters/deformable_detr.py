"""Integration: the original Deformable-DETR decoder (``DeformableTransformerDecoder`` of the
public Deformable-DETR repository and the forks built on it).

Recognised by duck typing: a module whose class is named ``DeformableTransformerDecoder``, with
``layers`` whose every layer has ``self_attn`` (``nn.MultiheadAttention``, sequence first),
``norm2`` (after self-attention), ``cross_attn``, ``norm1`` (after cross-attention), ``linear1``,
``linear2`` and ``norm3``. ``wrap`` finds it inside the whole ``DeformableDETR`` model
(``model.transformer.decoder``) too.

What is wrapped, per layer: ``self_attn`` (routes folded into the batch; the instruction route
through its ``in_proj_weight``), ``norm2`` (the instruction route's own copy: it is the norm
after self-attention in this layer) and ``linear1``/``linear2`` (the FFN-owning route's copies).
``cross_attn``, ``norm1``, ``norm3`` and the box heads of iterative refinement
(``decoder.bbox_embed``) run once over every route's queries.

The forward keeps its positional signature ``(tgt, reference_points, src, src_spatial_shapes,
src_level_start_index, src_valid_ratios, query_pos=None, src_padding_mask=None)`` and return
convention (``(stack(outputs), stack(references))`` with ``return_intermediate``, entry ``i``
being the reference layer ``i`` produced); ``tgt``, ``reference_points`` and ``query_pos`` are
tiled per route.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..routing import RouteLayout, split, tile
from .integration import QueryTilingIntegration, RoutePass
from .packing import MHACall
from .route_modules import LayerModules

__all__ = ["DeformableDetrIntegration"]

_LAYER_PARTS = ("self_attn", "norm2", "cross_attn", "norm1", "linear1", "linear2", "norm3")


def _is_original_decoder(module: nn.Module) -> bool:
    if type(module).__name__ != "DeformableTransformerDecoder":
        return False
    layers = getattr(module, "layers", None)
    return isinstance(layers, nn.ModuleList) and all(
        all(hasattr(layer, p) for p in _LAYER_PARTS)
        and isinstance(layer.self_attn, nn.MultiheadAttention)
        for layer in layers
    )


class DeformableDetrIntegration(QueryTilingIntegration):
    """The original ``DeformableTransformerDecoder`` (see the module docstring)."""

    name = "Deformable-DETR DeformableTransformerDecoder"
    _inputs = ("tgt", "reference_points", "query_pos")

    def find_decoder(self, model: nn.Module) -> nn.Module | None:
        found = [m for m in model.modules() if _is_original_decoder(m)]
        if len(found) > 1:
            raise ValueError(f"model holds {len(found)} DeformableTransformerDecoder: pass one")
        return found[0] if found else None

    def layer_modules(self, decoder: nn.Module) -> list[LayerModules]:
        return [
            LayerModules(layer, layer.self_attn, layer.norm2, (layer.linear1, layer.linear2))
            for layer in decoder.layers
        ]

    def attention_call(self, host: LayerModules) -> MHACall:
        return MHACall(bool(host.self_attn.batch_first))

    def tile_inputs(self, decoder, args, kwargs, num_routes) -> RoutePass:
        bound = inspect.signature(type(decoder).forward).bind(decoder, *args, **kwargs)
        a = bound.arguments
        layout = RouteLayout(num_routes, a["tgt"].shape[1], 0, 1)
        first = {"reference_points": a["reference_points"]}
        for name in self._inputs:
            if a.get(name) is not None:
                a[name] = tile(a[name], layout, 1)
        return RoutePass(layout, bound.args[1:], bound.kwargs, first)

    def split_outputs(self, decoder, output, route_pass: RoutePass):
        dim = 2 if decoder.return_intermediate else 1
        parts = [split(t, route_pass.layout, dim) for t in output]  # (outputs, references)
        names = [r.name for r in decoder.mrdetr_routes.routes]
        aux = {name: tuple(p[i] for p in parts) for i, name in enumerate(names) if i > 0}
        return tuple(p[0] for p in parts), aux

    def route_geometry(self, decoder, output, route_pass: RoutePass):
        if not decoder.return_intermediate:
            return {}
        first = route_pass.inputs["reference_points"]
        return {"reference_points": self._received(route_pass.layout, first, output[1])}

    @staticmethod
    def _received(layout: RouteLayout, reference_points: Tensor, references: Tensor) -> Tensor:
        """``[N, R, B, Q, 2 or 4]``: the reference each layer received per route (the input,
        then what the previous layer produced); 2-d points padded to boxes with
        ``w = h = 0.5`` when the layers mix points and boxes (``inverse_sigmoid(0.5) = 0``)."""
        produced = torch.stack(split(references, layout, 2))  # [R, N, B, Q, D]
        produced = produced.transpose(0, 1)  # [N, R, B, Q, D]
        first = reference_points.expand(layout.num_routes, -1, -1, -1)  # [R, B, Q, D0]
        if first.shape[-1] != produced.shape[-1]:
            first = torch.cat([first, first.new_full((*first.shape[:-1], 2), 0.5)], -1)
        return torch.cat([first[None], produced[:-1]])
