"""``HFDecoderIntegration``: the route mechanism on an HF transformers DETR-family decoder.

What every family shares is here; a family's file says only what differs (see the class
docstring). transformers 4.57 and 5.x are both supported; what differs between them is
recognised in one place, :mod:`mrdetr.adapters.hf_compat`.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import Tensor, nn

from ...routing import RouteLayout, split, tile
from ..hf_compat import layer_ffn, layer_hidden, query_position_arg, request_model_output
from ..integration import QueryTilingIntegration, RoutePass
from ..predictions import route_predictions
from ..route_modules import LayerModules

__all__ = ["HFDecoderIntegration", "HFSelfAttentionCall", "is_hf", "stack_routes"]


def is_hf(module: nn.Module, class_name: str) -> bool:
    """Whether ``module``'s class is transformers' class ``class_name``."""
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__.startswith("transformers.")


class HFSelfAttentionCall:
    """Call convention of HF's DETR-family self-attention: ``forward(hidden_states,
    attention_mask=None, position_embeddings=None, **kwargs) -> (out, weights)`` with
    ``q = k = hidden_states + position_embeddings`` and ``v = hidden_states``, all ``[B, L, C]``;
    ``attention_mask`` is added to the logits (``[L, L]`` float, RT-DETR's denoising mask)."""

    def __init__(self, module: nn.Module) -> None:
        self.signature = inspect.signature(type(module).forward)

    def unpack(self, args, kwargs):
        """``(q, k, v [B, L, C], attn_mask [L, L] or None, None)``."""
        a = self.signature.bind(None, *args, **kwargs).arguments
        hidden, pos = a["hidden_states"], a.get("position_embeddings")
        qk = hidden if pos is None else hidden + pos
        return qk, qk, hidden, a.get("attention_mask"), None

    def call(self, fn, q, k, v, attn_mask, key_padding_mask) -> Tensor:
        """The host's own forward on ``B'`` folded routes; ``[B', L, C]``."""
        pos = q - v  # q = k = hidden + pos was formed in unpack
        return fn(hidden_states=v, attention_mask=attn_mask, position_embeddings=pos)[0]

    def pack(self, out: Tensor):
        return out, None


def slice_route(output, layout: RouteLayout, i: int, dims: dict[str, int]):
    """Route ``i`` of a decoder ``ModelOutput``: each tensor field (or tuple of them) split
    along its query axis, ``dims[name]``, else 2 for ``intermediate_*`` fields
    (``[B, N, L, ...]``) and 1 for the others (``[B, L, ...]``); fields whose axis does not hold
    the ``L`` packed queries are kept."""

    def take(t, dim):
        if not isinstance(t, Tensor) or t.dim() <= dim or t.shape[dim] != layout.length:
            return t
        return split(t, layout, dim)[i]

    fields = {}
    for name, value in output.items():
        dim = dims.get(name, 2 if name.startswith("intermediate_") else 1)
        fields[name] = (
            tuple(take(t, dim) for t in value) if isinstance(value, tuple) else take(value, dim)
        )
    return type(output)(**fields)


def stack_routes(per_layer: Tensor, layout: RouteLayout) -> Tensor:
    """``[B, N, L, D]`` packed -> ``[N, R, B, Q, D]`` (the primary's denoising queries dropped)."""
    parts = split(per_layer, layout, 2)
    parts[0] = parts[0][:, :, layout.num_denoising :]
    return torch.stack(parts).permute(2, 0, 1, 3, 4)


class HFDecoderIntegration(QueryTilingIntegration):
    """The route mechanism on an HF transformers DETR-family decoder (subclass per family).

    The shared mechanism: find the decoder by class name, tile its query inputs per route
    (``[dn ; Q x R]`` along the query axis), run the host's own forward with the layers'
    self-attention (routes folded into the batch, the instruction route through the same
    projections), ``self_attn_layer_norm`` (the instruction route's own copy) and FFN
    (``mlp`` in 5.x, ``fc1``/``fc2`` in 4.57: the FFN-owning route's copy) made route-aware,
    and slice the ``ModelOutput`` per route. Cross-attention, the other norms and the box
    heads run once over every route's queries.

    A family says only what differs, as class attributes and optional hooks:

    Attributes:
        name: the family's name in error messages (``"transformers DeformableDetrDecoder"``).
        decoder_class: class name of the decoder (``"DeformableDetrDecoder"``).
        detector_class: class name of the detection model holding it
            (``"DeformableDetrForObjectDetection"``), for :func:`hf_route_predictions`.
        query_inputs: the decoder ``forward`` arguments holding one entry per query along
            dim 1 (``[B, L, ...]``), tiled per route; a training call must give them. The query
            position argument (named differently in 4.57 and 5.x) is tiled too, when given.
        output_query_dims: the query axis of decoder output fields that hold the packed
            queries elsewhere than dim 2 (``intermediate_*``) or dim 1 (the others) [none;
            D-FINE ``{"initial_reference_points": 2}``, Conditional-DETR
            ``{"reference_points": 0}``].

    Hooks (override where the family differs; defaults in brackets):
        ``num_denoising(decoder, num_inputs) -> int``: leading denoising queries among the
            ``num_inputs`` decoder queries [0].
        ``route_geometry(decoder, output, route_pass) -> dict``: ``reference_points`` and/or
            ``boxes`` ``[N, R, B, Q, D]`` of :class:`~mrdetr.adapters.RouteOutputs` from the
            packed ``output`` (an HF ``ModelOutput``) and ``route_pass.inputs`` (the untiled
            ``query_inputs``) [none]; :func:`stack_routes` unpacks an ``intermediate_*`` field.
        ``prediction_heads(model, num_layers) -> (class_heads, box_heads or None)``: the
            detector's heads for :func:`hf_route_predictions`; ``box_heads`` None when the
            refined boxes are in ``RouteOutputs.boxes`` [NotImplementedError].
        ``route_boxes(model, outputs) -> Tensor[N, R, B, Q, 4] or None``: every layer's boxes
            by the detector's own box head, for families whose boxes follow another rule than
            :func:`~mrdetr.adapters.route_predictions`' (LW-DETR's ``refine_bboxes``) [None].
        ``encoder_predictions(model_output) -> dict or None``: the encoder proposals
            ``{"pred_logits", "pred_boxes"}`` of a detector's output [None].
        ``route_layer_predictions(model, outputs, model_output) -> dict``: every route's
            per-layer predictions for :func:`hf_route_predictions` [``prediction_heads`` and
            ``encoder_predictions`` through :func:`~mrdetr.adapters.route_predictions`].
        ``route_heads(model, outputs, num_layers)``: as ``prediction_heads``, for heads that
            also read ``outputs.context`` (Grounding DINO's text) [``prediction_heads``].
        ``loss_inputs(model, outputs, model_output, predictions) -> dict``: entries added to
            every route's predictions for the family's loss (Grounding DINO: ``label_maps``,
            ``text_mask``) [none].
        ``layer_modules(decoder) -> list[LayerModules]``: where each layer's self-attention,
            its norm and the FFN are [``self_attn``, ``self_attn_layer_norm``, the FFN].
        ``query_input_names(decoder) -> tuple``: the ``decoder.forward`` arguments tiled per
            route [``query_inputs`` and the query position argument].
    """

    decoder_class = ""
    detector_class = ""
    query_inputs: tuple[str, ...] = ("inputs_embeds", "reference_points")
    output_query_dims: dict[str, int] = {}

    def find_decoder(self, model: nn.Module) -> nn.Module | None:
        found = [m for m in model.modules() if is_hf(m, self.decoder_class)]
        if len(found) > 1:
            raise ValueError(f"model holds {len(found)} {self.decoder_class} modules: pass one")
        return found[0] if found else None

    def layer_modules(self, decoder: nn.Module) -> list[LayerModules]:
        return [
            LayerModules(layer, layer.self_attn, layer.self_attn_layer_norm, layer_ffn(layer))
            for layer in decoder.layers
        ]

    def layer_hidden(self, decoder: nn.Module, layer_output) -> Tensor:
        return layer_hidden(layer_output)

    def attention_call(self, host: LayerModules) -> HFSelfAttentionCall:
        return HFSelfAttentionCall(host.self_attn)

    def num_denoising(self, decoder: nn.Module, num_inputs: int) -> int:
        """Leading denoising queries among ``num_inputs`` decoder queries (none by default)."""
        return 0

    def prediction_heads(self, model: nn.Module, num_layers: int):
        """``(class_heads, box_heads or None)`` of the detector ``model`` for its last
        ``num_layers`` decoder layers (see :func:`~mrdetr.adapters.route_predictions`)."""
        raise NotImplementedError(f"{self.name}: no prediction_heads for {self.detector_class}")

    def route_boxes(self, model: nn.Module, outputs) -> Tensor | None:
        """Every layer's boxes ``[N, R, B, Q, 4]`` of the :class:`~mrdetr.adapters.RouteOutputs`
        ``outputs`` by the detector ``model``'s heads, or None (default: ``outputs.boxes`` or
        :func:`~mrdetr.adapters.route_predictions`' rule)."""
        return None

    def encoder_predictions(self, model_output) -> dict[str, Tensor] | None:
        """The encoder proposals of the detector's ``model_output``, or None (default)."""
        return None

    def query_input_names(self, decoder: nn.Module) -> tuple[str | None, ...]:
        """Every ``decoder.forward`` argument tiled per route (those given): ``query_inputs``
        and the query position argument (:func:`~mrdetr.adapters.hf_compat.query_position_arg`,
        None when it has no known name)."""
        return (*self.query_inputs, query_position_arg(decoder))

    def route_layer_predictions(self, model: nn.Module, outputs, model_output=None) -> dict:
        """``{route: {"pred_logits", "pred_boxes", "aux_outputs"[, "enc_outputs"]}}`` of the
        detector ``model`` from its :class:`~mrdetr.adapters.RouteOutputs` (see
        :func:`hf_route_predictions`): its heads on the routes' hidden states."""
        boxes = self.route_boxes(model, outputs)
        if boxes is not None:  # the family's own box rule (LW-DETR)
            outputs = dataclasses.replace(outputs, boxes=boxes)
        classes, boxes = self.route_heads(model, outputs, outputs.hidden_states.shape[0])
        enc = None if model_output is None else self.encoder_predictions(model_output)
        return route_predictions(outputs, classes, boxes, enc_outputs=enc)

    def route_heads(self, model: nn.Module, outputs, num_layers: int):
        """``prediction_heads`` for heads that depend on the pass (``outputs``: the
        :class:`~mrdetr.adapters.RouteOutputs`); default: ``prediction_heads(model,
        num_layers)``."""
        return self.prediction_heads(model, num_layers)

    def loss_inputs(self, model, outputs, model_output, predictions) -> dict:
        """Entries added to every route's predictions for the family's loss (default: none)."""
        return {}

    def tile_inputs(self, decoder, args, kwargs, num_routes) -> RoutePass:
        bound = inspect.signature(type(decoder).forward).bind(decoder, *args, **kwargs)
        a = bound.arguments
        missing = [n for n in self.query_inputs if a.get(n) is None]
        if missing:
            raise ValueError(
                f"{self.decoder_class}: a training pass needs {' and '.join(self.query_inputs)}; "
                f"{', '.join(missing)} not given"
            )
        length = a[self.query_inputs[0]].shape[1]
        dn = self.num_denoising(decoder, length)
        layout = RouteLayout(num_routes, length - dn, dn, 1)
        names = self.query_input_names(decoder)
        inputs = {n: a[n] for n in names if n is not None and a.get(n) is not None}
        inputs["as_tuple"] = request_model_output(decoder, a)  # packed: always a ModelOutput
        for name in names:
            if name in inputs:
                a[name] = tile(a[name], layout, 1)
        return RoutePass(layout, bound.args[1:], bound.kwargs, inputs)

    def split_outputs(self, decoder, output, route_pass: RoutePass):
        def route(i):
            part = slice_route(output, route_pass.layout, i, self.output_query_dims)
            return part.to_tuple() if route_pass.inputs["as_tuple"] else part  # as asked

        names = [r.name for r in decoder.mrdetr_routes.routes]
        return route(0), {name: route(i) for i, name in enumerate(names) if i > 0}
