"""HF transformers ``DeformableDetrDecoder`` (inside ``DeformableDetrForObjectDetection`` /
``DeformableDetrModel``, or bare), with or without box refinement and two-stage."""

from __future__ import annotations

import torch

from .base import HFDecoderIntegration, stack_routes

__all__ = ["HFDeformableDetrIntegration"]


class HFDeformableDetrIntegration(HFDecoderIntegration):
    """``DeformableDetrDecoder``: per-layer reference points; two-stage encoder proposals."""

    name = "transformers DeformableDetrDecoder"
    decoder_class = "DeformableDetrDecoder"
    detector_class = "DeformableDetrForObjectDetection"

    def route_geometry(self, decoder, output, route_pass):
        """The reference each layer received, per route: the input for layer 0, then what the
        previous layer produced. 2-d points are padded to boxes with ``w = h = 0.5``
        (``inverse_sigmoid(0.5) = 0``: a box head's size output passes unchanged, as in
        Deformable-DETR) when the layers mix points and boxes."""
        layout = route_pass.layout
        routes = stack_routes(output.intermediate_reference_points, layout)  # [N, R, B, Q, D]
        first = route_pass.inputs["reference_points"][:, layout.num_denoising :]
        first = first.expand(layout.num_routes, -1, -1, -1)
        if first.shape[-1] != routes.shape[-1]:
            first = torch.cat([first, first.new_full((*first.shape[:-1], 2), 0.5)], -1)
        return {"reference_points": torch.cat([first[None], routes[:-1]])}

    def prediction_heads(self, model, num_layers):
        """``class_embed`` / ``bbox_embed`` of the layers (two-stage models have one more)."""
        return model.class_embed[:num_layers], model.bbox_embed[:num_layers]

    def encoder_predictions(self, model_output):
        """Two-stage: ``enc_outputs_class`` and sigmoid ``enc_outputs_coord_logits``."""
        if model_output.enc_outputs_class is None:
            return None
        return {
            "pred_logits": model_output.enc_outputs_class,
            "pred_boxes": model_output.enc_outputs_coord_logits.sigmoid(),
        }
