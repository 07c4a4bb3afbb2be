"""HF transformers ``LwDetrDecoder`` and ``RfDetrDecoder`` (inside ``LwDetrForObjectDetection`` /
``RfDetrForObjectDetection``; transformers 5.x only): one decoder design, one integration.

What differs from the shared mechanism:

- Group DETR: in training the decoder holds ``config.group_detr`` groups of ``config.num_queries``
  queries (``L = G * Q``) and the self-attention folds the groups into the batch, so groups never
  attend to each other. Every route holds all ``G`` groups (the routes are tiled ``[L x R]`` and
  folded into the batch before the host's self-attention, which then folds the groups); the
  instruction route attends within each group too (:class:`GroupSelfAttentionCall`).
- The self-attention takes no attention mask: ``forward(hidden_states, position_embeddings)``.
- Every layer refines the same reference boxes: the decoder's input ``reference_points``; the
  detector's shared heads give ``refine_bboxes(reference, bbox_embed(h))`` and
  ``class_embed(h)`` for every layer (:meth:`HFLwDetrIntegration.route_boxes`).
- The final ``decoder.layernorm`` is applied to every layer's output (the intermediate outputs).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from ...routing import instructive_attend
from ..hf_compat import layer_hidden
from .base import HFDecoderIntegration, HFSelfAttentionCall

__all__ = ["GroupSelfAttentionCall", "HFLwDetrIntegration", "HFRfDetrIntegration"]


class GroupSelfAttentionCall(HFSelfAttentionCall):
    """Call convention of ``LwDetrAttention`` / ``RfDetrAttention``: ``forward(hidden_states
    [B, L, C], position_embeddings [B, L, C] = None) -> (out [B, L, C], weights)``, ``q = k =
    proj(hidden + pos)``, ``v = proj(hidden)``, no attention mask; in training the ``L`` queries
    are ``config.group_detr`` consecutive groups attending only within themselves.

    In the packed pass it carries ``(q = hidden + pos, k = pos, v = hidden)``, so the host's own
    forward receives ``hidden`` and ``pos`` unchanged (the primary route is bit for bit the
    host's).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.module = module

    def groups(self) -> int:
        """Query groups in a call: ``config.group_detr`` in training, 1 in eval (as the host)."""
        return self.module.config.group_detr if self.module.training else 1

    def unpack(self, args, kwargs):
        """``(hidden + pos, pos, hidden [B, L, C], None, None)``."""
        a = self.signature.bind(None, *args, **kwargs).arguments
        hidden, pos = a["hidden_states"], a.get("position_embeddings")
        pos = torch.zeros_like(hidden) if pos is None else pos
        return hidden + pos, pos, hidden, None, None

    def call(self, fn, q, k, v, attn_mask, key_padding_mask) -> Tensor:
        """The host's own forward (``k`` is the position embedding); ``[B', L, C]``."""
        return fn(hidden_states=v, position_embeddings=k)[0]

    def instructive_attend(
        self, query, key, value, weights, tokens, tokens_value, *, attn_mask=None,
        key_padding_mask=None, dropout_p=0.0,
    ) -> tuple[Tensor, None]:  # fmt: skip
        """:func:`~mrdetr.routing.instructive_attend` within each query group (every group sees
        the instruction tokens): ``query = hidden + pos`` and ``value = hidden`` ``[B, L, C]``
        -> ``([B, L, C], None)``; ``key`` (the position embedding) is not needed."""
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError(f"{type(self.module).__name__} takes no attention or padding mask")
        g, (b, length) = self.groups(), query.shape[:2]
        if length % g:
            raise ValueError(
                f"{type(self.module).__name__}: config.group_detr={g} must divide the "
                f"{length} queries of a route"
            )

        def fold(t: Tensor) -> Tensor:  # [B, G * Q, C] -> [G * B, Q, C]
            return torch.cat(t.split(length // g, 1), 0)

        out = instructive_attend(
            fold(query), None, fold(value), weights, tokens, tokens_value, dropout_p=dropout_p
        )[0]
        return torch.cat(out.split(b, 0), 1), None


class HFLwDetrIntegration(HFDecoderIntegration):
    """``LwDetrDecoder``: Group DETR queries, fixed reference boxes, final ``layernorm`` on every
    layer's output, heads shared across layers (see the module docstring)."""

    name = "transformers LwDetrDecoder"
    decoder_class = "LwDetrDecoder"
    detector_class = "LwDetrForObjectDetection"

    def attention_call(self, host) -> GroupSelfAttentionCall:
        return GroupSelfAttentionCall(host.self_attn)

    def tile_inputs(self, decoder, args, kwargs, num_routes):
        rp = super().tile_inputs(decoder, args, kwargs, num_routes)
        g, n = decoder.config.group_detr, rp.layout.num_queries
        if n % g:
            raise ValueError(
                f"{self.decoder_class}: a training pass holds config.group_detr={g} groups of "
                f"queries, got {n} queries"
            )
        return rp

    def layer_hidden(self, decoder, layer_output) -> Tensor:
        """A layer's output through the decoder's final ``layernorm`` (its intermediate output)."""
        return decoder.layernorm(layer_hidden(layer_output))

    def route_geometry(self, decoder, output, route_pass):
        """The reference boxes every layer refines: the decoder's input, the same per route."""
        ref = route_pass.inputs["reference_points"]  # [B, L, 4]
        return {"reference_points": ref.expand(len(decoder.layers), route_pass.layout.num_routes,
                                               *ref.shape)}  # fmt: skip

    def prediction_heads(self, model, num_layers):
        """The shared ``class_embed``; boxes come from :meth:`route_boxes`."""
        return model.class_embed, None

    def route_boxes(self, model, outputs) -> Tensor:
        """``refine_bboxes(reference, bbox_embed(h))`` per layer and route, with the host's own
        ``refine_bboxes`` (its modeling module's); ``[N, R, B, Q, 4]``."""
        refine = sys.modules[type(model).__module__].refine_bboxes
        return refine(outputs.reference_points, model.bbox_embed(outputs.hidden_states))

    def encoder_predictions(self, model_output):
        """Every group's top proposals: ``enc_outputs_class`` and ``enc_outputs_coord_logits``
        (already boxes)."""
        if model_output.enc_outputs_class is None:
            return None
        return {
            "pred_logits": model_output.enc_outputs_class,
            "pred_boxes": model_output.enc_outputs_coord_logits,
        }


class HFRfDetrIntegration(HFLwDetrIntegration):
    """``RfDetrDecoder``: LW-DETR's decoder (RF-DETR differs in its backbone)."""

    name = "transformers RfDetrDecoder"
    decoder_class = "RfDetrDecoder"
    detector_class = "RfDetrForObjectDetection"
