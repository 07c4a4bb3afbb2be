"""HF transformers ``RTDetrDecoder`` (inside ``RTDetrForObjectDetection``): box refinement in
the decoder; contrastive denoising queries in front of the matching queries in training."""

from __future__ import annotations

from .base import HFDecoderIntegration, stack_routes

__all__ = ["HFRTDetrIntegration"]


class HFRTDetrIntegration(HFDecoderIntegration):
    """``RTDetrDecoder``: ``inputs_embeds`` carry ``dn`` denoising queries in front of the
    ``config.num_queries`` matching queries when ``labels`` are given in training; they stay in
    the primary route only (their attention mask kept, never seeing another route's queries or
    instruction tokens)."""

    name = "transformers RTDetrDecoder"
    decoder_class = "RTDetrDecoder"
    detector_class = "RTDetrForObjectDetection"

    def num_denoising(self, decoder, num_inputs):
        q = decoder.config.num_queries
        if num_inputs < q:
            raise ValueError(
                f"{self.decoder_class}: expected at least config.num_queries={q} queries, "
                f"got {num_inputs}"
            )
        return num_inputs - q

    def route_geometry(self, decoder, output, route_pass):
        """The refined boxes every layer produced (RT-DETR's predictions), per route."""
        return {"boxes": stack_routes(output.intermediate_reference_points, route_pass.layout)}

    def prediction_heads(self, model, num_layers):
        """The decoder's own ``class_embed``; boxes come refined (``RouteOutputs.boxes``)."""
        return model.model.decoder.class_embed, None

    def encoder_predictions(self, model_output):
        """``enc_topk_logits`` and ``enc_topk_bboxes``."""
        if model_output.enc_topk_logits is None:
            return None
        return {
            "pred_logits": model_output.enc_topk_logits,
            "pred_boxes": model_output.enc_topk_bboxes,
        }
