"""HF transformers ``DabDetrDecoder`` (inside ``DabDetrForObjectDetection``): 4-d anchors
refined every layer by the decoder's shared ``bbox_embed``."""

from __future__ import annotations

import torch

from ...routing import split
from ..route_modules import LayerModules
from .content_position import HFContentPositionIntegration, ProjectedAttentionCall

__all__ = ["HFDabDetrIntegration"]


class HFDabDetrIntegration(HFContentPositionIntegration):
    """``DabDetrDecoder``. Its self-attention wrapper (``layer.self_attn``) holds the content
    and position projections, the attention core (``self_attn.self_attn``), the residual and
    its norm (``self_attn.self_attn_layer_norm``); its FFN module (``layer.mlp``) holds its norm.
    The route mechanism acts on the attention core (instruction tokens: keys
    ``self_attn_key_content_proj(tokens) + self_attn_key_pos_proj(tokens_pos)``, values
    ``self_attn_value_proj(tokens)``), on the norm inside the wrapper (the instruction route's
    copy) and on ``mlp.fc1``/``mlp.fc2`` (the FFN-owning route's copies; the FFN norm stays
    shared). A route owning its self-attention owns a copy of the attention core (output
    projection); the content/position projections stay shared."""

    name = "transformers DabDetrDecoder"
    decoder_class = "DabDetrDecoder"
    detector_class = "DabDetrForObjectDetection"
    query_inputs = ("inputs_embeds", "query_position_embeddings")  # the anchors [B, Q, 4]
    output_query_dims = {"reference_points": 2}  # [N, B, L, 4]

    def layer_modules(self, decoder):
        mods = []
        for layer in decoder.layers:
            sa = layer.self_attn
            norm = sa.self_attn_layer_norm
            ffn = (layer.mlp.fc1, layer.mlp.fc2)
            mods.append(
                LayerModules(layer, sa.self_attn, norm, ffn, embed_dim=norm.normalized_shape[0])
            )
        return mods

    def attention_call(self, host):
        sa = host.layer.self_attn
        return ProjectedAttentionCall(
            sa.self_attn, sa.self_attn_key_content_proj, sa.self_attn_key_pos_proj,
            sa.self_attn_value_proj,
        )  # fmt: skip

    def route_geometry(self, decoder, output, route_pass):
        """The anchors each layer received (``reference_points`` ``[N, B, L, 4]``), per route."""
        refs = output.reference_points
        return {"reference_points": torch.stack(split(refs, route_pass.layout, 2), 1)}

    def prediction_heads(self, model, num_layers):
        """``class_embed`` and ``bbox_predictor``, shared by every layer."""
        return model.class_embed, model.bbox_predictor
