"""HF transformers ``ConditionalDetrDecoder`` (inside ``ConditionalDetrForObjectDetection``):
separate content/position self-attention projections, fixed 2-d reference points."""

from __future__ import annotations

import inspect

import torch

from ...routing import split
from ..hf_compat import layer_ffn
from ..route_modules import LayerModules
from .content_position import (
    ContentPositionCall,
    HFContentPositionIntegration,
    ProjectedAttentionCall,
)

__all__ = ["HFConditionalDetrIntegration"]

# the decoder's query position argument: transformers 5.x, 4.57
_POSITION_ARGS = ("object_queries_position_embeddings", "query_position_embeddings")


class HFConditionalDetrIntegration(HFContentPositionIntegration):
    """``ConditionalDetrDecoder``. Instruction tokens enter the self-attention through its own
    projections: in 5.x the module's ``q/k_content_proj`` (tokens) and ``q/k_pos_proj``
    (``tokens_pos``), ``v_proj`` (tokens); in 4.57 the layer's ``sa_kcontent_proj``,
    ``sa_kpos_proj`` and ``sa_v_proj`` around the attention module ``self_attn``. The
    reference points (``ref_point_head`` of the query positions) are the same for every
    layer; predictions as the detector's: ``bbox_predictor(h)`` shifted at its centre."""

    name = "transformers ConditionalDetrDecoder"
    decoder_class = "ConditionalDetrDecoder"
    detector_class = "ConditionalDetrForObjectDetection"
    query_inputs = ("inputs_embeds",)
    output_query_dims = {"reference_points": 0}  # [L, B, 2]

    def query_input_names(self, decoder):
        params = inspect.signature(type(decoder).forward).parameters
        return ("inputs_embeds", *(n for n in _POSITION_ARGS if n in params))

    def layer_modules(self, decoder):
        mods = []
        for layer in decoder.layers:
            norm = layer.self_attn_layer_norm
            dim = norm.normalized_shape[0]
            mods.append(LayerModules(layer, layer.self_attn, norm, layer_ffn(layer), embed_dim=dim))
        return mods

    def attention_call(self, host):
        layer = host.layer
        if hasattr(layer, "sa_kcontent_proj"):  # 4.57: projections on the layer
            return ProjectedAttentionCall(
                layer.self_attn, layer.sa_kcontent_proj, layer.sa_kpos_proj, layer.sa_v_proj
            )
        return ContentPositionCall(layer.self_attn)

    def route_geometry(self, decoder, output, route_pass):
        """The 2-d reference points (``[L, B, 2]`` in the output) per route, every layer."""
        refs = output.reference_points.transpose(0, 1)  # [B, L, 2]
        per_route = torch.stack(split(refs, route_pass.layout, 1))  # [R, B, Q, 2]
        n = len(decoder.layers)
        return {"reference_points": per_route.expand(n, *per_route.shape)}

    def prediction_heads(self, model, num_layers):
        """``class_labels_classifier`` and ``bbox_predictor``, shared by every layer."""
        return model.class_labels_classifier, model.bbox_predictor
