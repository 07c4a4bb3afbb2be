"""Integrations: HF transformers ``DeformableDetr`` (box refinement, two-stage) and ``RTDetr``
(DINO-style denoising) decoders, and the helper that feeds their routes to the criterion.

What is wrapped, per decoder layer (``DeformableDetrDecoderLayer`` / ``RTDetrDecoderLayer``):
``self_attn`` (separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``out_proj`` in 4.57;
routes folded into the batch, the instruction route through the same projections),
``self_attn_layer_norm`` (the instruction route's own copy) and ``mlp`` (transformers 5.x;
``fc1``/``fc2`` on the layer in 4.57): the FFN-owning route's own copy. ``encoder_attn`` (the
deformable cross-attention), ``encoder_attn_layer_norm``, ``final_layer_norm``, the box heads of
iterative refinement and RT-DETR's ``query_pos_head`` run once over every route's queries.

Tiled per route (query axis): ``inputs_embeds``, the query positions
(``object_queries_position_embeddings``; ``position_embeddings`` in 4.57) and
``reference_points``. RT-DETR's contrastive denoising queries (``dn`` leading queries, present
when ``labels`` are passed in training) stay in the primary route only: they keep their
attention mask and never see another route's queries or instruction tokens.

Supported: transformers 4.57 and 5.x; what differs between them is recognised in one place,
:mod:`mrdetr.adapters.hf_compat`.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from .hf_compat import layer_ffn, layer_hidden, query_position_arg, request_model_output
from .integration import QueryTilingIntegration, RouteOutputs
from .packing import RouteLayout, split, tile
from .predictions import route_predictions
from .route_modules import LayerModules

__all__ = [
    "HFDeformableDetrIntegration",
    "HFRTDetrIntegration",
    "HFSelfAttentionCall",
    "hf_route_predictions",
]


def _is_hf(module: nn.Module, class_name: str) -> bool:
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__.startswith("transformers.")


class HFSelfAttentionCall:
    """Call convention of HF's DETR-family self-attention: ``forward(hidden_states,
    attention_mask=None, position_embeddings=None, **kwargs) -> (out, weights)`` with
    ``q = k = hidden_states + position_embeddings`` and ``v = hidden_states``, all ``[B, L, C]``;
    ``attention_mask`` is added to the logits (``[L, L]`` float, RT-DETR's denoising mask)."""

    def __init__(self, module: nn.Module) -> None:
        self.signature = inspect.signature(type(module).forward)
        self.extra: dict = {}

    def unpack(self, args, kwargs):
        """``(q, k, v [B, L, C], attn_mask [L, L] or None, None)``."""
        a = self.signature.bind(None, *args, **kwargs).arguments
        hidden, pos = a["hidden_states"], a.get("position_embeddings")
        self.extra = dict(a.get("kwargs", {}))
        qk = hidden if pos is None else hidden + pos
        return qk, qk, hidden, a.get("attention_mask"), None

    def call(self, fn, q, k, v, attn_mask, key_padding_mask) -> Tensor:
        """The host's own forward on ``B'`` folded routes; ``[B', L, C]``."""
        pos = q - v  # q = k = hidden + pos was formed in unpack
        return fn(hidden_states=v, attention_mask=attn_mask, position_embeddings=pos)[0]

    def pack(self, out: Tensor):
        return out, None


def _slice_output(output, layout: RouteLayout, i: int, drop_denoising: bool = False):
    """Route ``i`` of an HF ``ModelOutput`` (``intermediate_*`` fields ``[B, N, L, ...]``, the
    others ``[B, L, ...]`` or tuples of them); tensors without ``L`` queries are kept."""

    def take(t, dim):
        if not isinstance(t, Tensor) or t.dim() <= dim or t.shape[dim] != layout.length:
            return t
        part = split(t, layout, dim)[i]
        return (
            part.narrow(dim, layout.num_denoising, layout.num_queries) if drop_denoising else part
        )

    fields = {}
    for name, value in output.items():
        dim = 2 if name.startswith("intermediate_") else 1
        if isinstance(value, tuple):
            fields[name] = tuple(take(t, dim) for t in value)
        else:
            fields[name] = take(value, dim)
    return type(output)(**fields)


def _stack_routes(per_layer: Tensor, layout: RouteLayout) -> Tensor:
    """``[B, N, L, D]`` packed -> ``[N, R, B, Q, D]`` (the primary's denoising queries dropped)."""
    parts = split(per_layer, layout, 2)
    dn = layout.num_denoising
    parts[0] = parts[0][:, :, dn:]
    return torch.stack(parts).permute(2, 0, 1, 3, 4)


class _HFDecoderIntegration(QueryTilingIntegration):
    """Shared by the HF families: modules per layer, the attention call, output slicing."""

    decoder_class = ""

    def find_decoder(self, model: nn.Module) -> nn.Module | None:
        found = [m for m in model.modules() if _is_hf(m, self.decoder_class)]
        if len(found) > 1:
            raise ValueError(f"model holds {len(found)} {self.decoder_class} modules: pass one")
        return found[0] if found else None

    def layer_modules(self, decoder: nn.Module) -> list[LayerModules]:
        mods = []
        for layer in decoder.layers:
            mods.append(LayerModules(
                layer, layer.self_attn, layer.self_attn_layer_norm, layer_ffn(layer),
                layer.final_layer_norm,
            ))  # fmt: skip
        return mods

    def layer_hidden(self, decoder: nn.Module, layer_output) -> Tensor:
        return layer_hidden(layer_output)

    def attention_call(self, host: LayerModules) -> HFSelfAttentionCall:
        return HFSelfAttentionCall(host.self_attn)

    def num_denoising(self, decoder: nn.Module, num_inputs: int) -> int:
        """Leading denoising queries among ``num_inputs`` decoder queries (none by default)."""
        return 0

    def tile_inputs(self, decoder, args, kwargs, num_routes):
        bound = inspect.signature(type(decoder).forward).bind(decoder, *args, **kwargs)
        a = bound.arguments
        if a.get("inputs_embeds") is None or a.get("reference_points") is None:
            raise ValueError(
                f"{self.decoder_class}: a training pass needs inputs_embeds and reference_points"
            )
        length = a["inputs_embeds"].shape[1]
        dn = self.num_denoising(decoder, length)
        layout = RouteLayout(num_routes, length - dn, dn, 1)
        self._pass = {
            "layout": layout,
            "reference_points": a["reference_points"],
            "as_tuple": request_model_output(decoder, a),  # packed output: always a ModelOutput
        }
        for name in ("inputs_embeds", query_position_arg(decoder), "reference_points"):
            if name is not None and a.get(name) is not None:
                a[name] = tile(a[name], layout, 1)
        return bound.args[1:], bound.kwargs, layout

    def split_outputs(self, decoder, output, layout: RouteLayout, hidden):
        def route(i):
            part = _slice_output(output, layout, i)
            return part.to_tuple() if self._pass["as_tuple"] else part  # as the caller asked

        aux = {r.name: route(i) for i, r in enumerate(decoder.mrdetr_routes.routes[1:], start=1)}
        self._pass["output"] = output
        return route(0), aux

    def route_geometry(self, first: Tensor, output, layout: RouteLayout) -> dict[str, Tensor]:
        """``reference_points`` / ``boxes`` of :class:`RouteOutputs`, from the decoder's input
        ``first`` reference points (one route) and its packed ``output``."""
        return {}

    def train_forward(self, decoder, state, forward, args, kwargs):
        self._pass = {}  # this pass's layout, input reference points and packed output
        try:
            primary = super().train_forward(decoder, state, forward, args, kwargs)
            p = self._pass
            for name, value in self.route_geometry(
                p["reference_points"], p["output"], p["layout"]
            ).items():
                setattr(state.last, name, value)
        finally:
            self._pass = {}
        return primary


class HFDeformableDetrIntegration(_HFDecoderIntegration):
    """``transformers`` ``DeformableDetrDecoder`` (inside ``DeformableDetrForObjectDetection`` /
    ``DeformableDetrModel``, or bare), with or without box refinement and two-stage."""

    name = "transformers DeformableDetrDecoder"
    decoder_class = "DeformableDetrDecoder"

    def route_geometry(self, first, output, layout):
        """The reference each layer received, per route: the input for layer 0, then what the
        previous layer produced. 2-d points are padded to boxes with ``w = h = 0.5``
        (``inverse_sigmoid(0.5) = 0``: a box head's size output passes unchanged, as in
        Deformable-DETR) when the layers mix points and boxes."""
        produced = output.intermediate_reference_points  # [B, N, L, 2 or 4]
        routes = _stack_routes(produced, layout)  # [N, R, B, Q, D]
        first = first[:, layout.num_denoising :].expand(layout.num_routes, -1, -1, -1)
        dims = {first.shape[-1], routes.shape[-1]}
        if len(dims) > 1:
            first = torch.cat([first, first.new_full((*first.shape[:-1], 2), 0.5)], -1)
        return {"reference_points": torch.cat([first[None], routes[:-1]])}


class HFRTDetrIntegration(_HFDecoderIntegration):
    """``transformers`` ``RTDetrDecoder`` (inside ``RTDetrForObjectDetection``): box refinement
    in the decoder; ``inputs_embeds`` carry ``dn`` denoising queries in front of the
    ``config.num_queries`` matching queries when ``labels`` are given in training."""

    name = "transformers RTDetrDecoder"
    decoder_class = "RTDetrDecoder"

    def num_denoising(self, decoder, num_inputs):
        q = decoder.config.num_queries
        if num_inputs < q:
            raise ValueError(
                f"RTDetrDecoder: expected at least config.num_queries={q} queries, got {num_inputs}"
            )
        return num_inputs - q

    def route_geometry(self, first, output, layout):
        """The refined boxes every layer produced (RT-DETR's predictions), per route."""
        return {"boxes": _stack_routes(output.intermediate_reference_points, layout)}


def hf_route_predictions(
    model: nn.Module, outputs: RouteOutputs, model_output=None
) -> dict[str, dict]:
    """Every route's per-layer logits and boxes for ``MultiRouteCriterion``, from a wrapped HF
    detector's :class:`RouteOutputs` and its own heads (exactly how the detector predicts).

    Args:
        model: the wrapped ``DeformableDetrForObjectDetection`` or ``RTDetrForObjectDetection``.
        outputs: ``mrdetr.adapters.route_outputs(model)`` after a training forward.
        model_output: that forward's return value; adds the encoder proposals to the primary
            route as ``enc_outputs`` (two-stage Deformable-DETR: ``enc_outputs_class`` and
            sigmoid ``enc_outputs_coord_logits``; RT-DETR: ``enc_topk_logits`` and
            ``enc_topk_bboxes``).

    Returns:
        ``{route: {"pred_logits" [B, Q, K], "pred_boxes" [B, Q, 4], "aux_outputs": [...]}}``;
        RT-DETR's denoising queries are not included (transformers' own loss covers them).
    """
    n = outputs.hidden_states.shape[0]
    enc = None
    if _is_hf(model, "DeformableDetrForObjectDetection"):
        classes, boxes = model.class_embed[:n], model.bbox_embed[:n]  # two-stage: N+1 heads
        if model_output is not None and model_output.enc_outputs_class is not None:
            enc = {
                "pred_logits": model_output.enc_outputs_class,
                "pred_boxes": model_output.enc_outputs_coord_logits.sigmoid(),
            }
    elif _is_hf(model, "RTDetrForObjectDetection"):
        classes, boxes = model.model.decoder.class_embed, None
        if model_output is not None and model_output.enc_topk_logits is not None:
            enc = {
                "pred_logits": model_output.enc_topk_logits,
                "pred_boxes": model_output.enc_topk_bboxes,
            }
    else:
        raise TypeError(
            "model must be a transformers DeformableDetrForObjectDetection or "
            f"RTDetrForObjectDetection, got {type(model).__name__}"
        )
    return route_predictions(outputs, classes, boxes, enc_outputs=enc)
