"""HF transformers ``DFineDecoder`` and ``Deimv2Decoder``: RT-DETR's route design (denoising
queries first, per-layer heads in the decoder) with boxes predicted through corner
distributions (Fine-grained Distribution Refinement).

What differs from :class:`~mrdetr.adapters.hf.HFRTDetrIntegration`: the layers' predictions
chain through the decoder's loop (each layer's corners add to the previous layer's; the
location-quality head reads them), so every route's predictions are the decoder's own outputs
sliced per route, never recomputed from hidden states. In training the decoder gives ``N + 1``
logits and boxes (the first from ``pre_bbox_head`` after layer 0) and ``N`` corner
distributions and initial boxes. The gateway after cross-attention (D-FINE; DEIMv2 optionally)
and DEIMv2's RMSNorm and SwiGLU FFN need nothing here: the gateway is shared like every
cross-attention part, a route owning the FFN copies the whole ``mlp`` module (SwiGLU included)
and the instruction route copies the norm after self-attention whatever its class.
"""

from __future__ import annotations

from torch import Tensor

from .base import stack_routes
from .rt_detr import HFRTDetrIntegration

__all__ = ["HFDFineIntegration", "HFDeimv2Integration"]

# decoder output field -> key of RouteOutputs.predictions
_FIELDS = {
    "intermediate_logits": "logits",
    "intermediate_reference_points": "boxes",
    "intermediate_predicted_corners": "pred_corners",
    "initial_reference_points": "ref_points",
}


class HFDFineIntegration(HFRTDetrIntegration):
    """``DFineDecoder`` (inside ``DFineForObjectDetection``).

    :class:`~mrdetr.adapters.RouteOutputs` carries ``boxes`` (``[N, R, B, Q, 4]``, every
    layer's refined boxes) and ``predictions``: ``logits`` ``[N + 1, R, B, Q, K]`` and
    ``boxes`` ``[N + 1, R, B, Q, 4]`` (``pre_bbox_head``'s first), ``pred_corners``
    ``[N, R, B, Q, 4 (bins + 1)]``, ``ref_points`` ``[N, R, B, Q, 4]``; the matching queries
    only (the primary route's denoising queries dropped).
    """

    name = "transformers DFineDecoder"
    decoder_class = "DFineDecoder"
    detector_class = "DFineForObjectDetection"
    output_query_dims = {"initial_reference_points": 2}

    def route_geometry(self, decoder, output, route_pass):
        """Every layer's refined boxes, and the decoder's per-layer predictions, per route
        (none when the decoder has no heads: a bare ``DFineModel`` decoder)."""
        layout = route_pass.layout
        fields = {key: getattr(output, name, None) for name, key in _FIELDS.items()}
        predictions = {
            key: stack_routes(value, layout)
            for key, value in fields.items()
            if isinstance(value, Tensor)  # an empty tuple without heads
        }
        geometry = {"predictions": predictions}
        if "pred_corners" in predictions:
            n = predictions["pred_corners"].shape[0]
            geometry["boxes"] = predictions["boxes"][-n:]
        return geometry

    def route_layer_predictions(self, model, outputs, model_output=None):
        """Every route's layers as the family's loss takes them: per layer ``pred_logits``,
        ``pred_boxes``, ``pred_corners`` and ``ref_points`` (the last layer in the dict, the
        others in ``"aux_outputs"``), the ``pre_bbox_head`` prediction after layer 0 as
        ``"pre_outputs"`` ``{"pred_logits", "pred_boxes"}`` and, for the primary route,
        ``enc_topk_logits`` / ``enc_topk_bboxes`` as ``"enc_outputs"``."""
        p = outputs.predictions
        if "pred_corners" not in p:
            raise ValueError(
                f"{self.decoder_class}: the route outputs hold no per-layer predictions (a "
                f"training pass of a {self.detector_class} gives them)"
            )
        n = p["pred_corners"].shape[0]
        pre = p["logits"].shape[0] - n  # 1 in training: pre_bbox_head's prediction first
        result = {}
        for r, route in enumerate(outputs.routes):
            layers = [
                {
                    "pred_logits": p["logits"][pre + i, r],
                    "pred_boxes": p["boxes"][pre + i, r],
                    "pred_corners": p["pred_corners"][i, r],
                    "ref_points": p["ref_points"][i, r],
                }
                for i in range(n)
            ]
            result[route.name] = {**layers[-1], "aux_outputs": layers[:-1]}
            if pre:
                result[route.name]["pre_outputs"] = {
                    "pred_logits": p["logits"][0, r],
                    "pred_boxes": p["boxes"][0, r],
                }
        enc = None if model_output is None else self.encoder_predictions(model_output)
        if enc is not None:
            result[outputs.routes[0].name]["enc_outputs"] = enc
        return result


class HFDeimv2Integration(HFDFineIntegration):
    """``Deimv2Decoder`` (inside ``Deimv2ForObjectDetection``, transformers 5.x): D-FINE's
    decoder loop with RMSNorm, a SwiGLU FFN and an optional gateway."""

    name = "transformers Deimv2Decoder"
    decoder_class = "Deimv2Decoder"
    detector_class = "Deimv2ForObjectDetection"
