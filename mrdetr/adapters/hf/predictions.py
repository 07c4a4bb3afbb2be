"""``hf_route_predictions``: a wrapped HF detector's routes -> ``MultiRouteCriterion``'s input."""

from __future__ import annotations

from torch import nn

from ..integration import RouteOutputs, registered_integrations
from .base import HFDecoderIntegration, is_hf

__all__ = ["hf_route_predictions"]


def _family(model: nn.Module) -> HFDecoderIntegration:
    families = [i for i in registered_integrations() if isinstance(i, HFDecoderIntegration)]
    for family in families:
        if family.detector_class and is_hf(model, family.detector_class):
            return family
    names = " or ".join(f.detector_class for f in families if f.detector_class)
    raise TypeError(f"model must be a transformers {names}, got {type(model).__name__}")


def hf_route_predictions(
    model: nn.Module, outputs: RouteOutputs, model_output=None
) -> dict[str, dict]:
    """Every route's per-layer logits and boxes for ``MultiRouteCriterion``, from a wrapped HF
    detector's :class:`RouteOutputs` and its own heads (exactly how the detector predicts).

    Args:
        model: the wrapped detector of a registered HF family (``detector_class``, e.g.
            ``DeformableDetrForObjectDetection`` or ``RTDetrForObjectDetection``).
        outputs: ``mrdetr.adapters.route_outputs(model)`` after a training forward.
        model_output: that forward's return value; adds the encoder proposals to the primary
            route as ``enc_outputs`` (two-stage Deformable-DETR: ``enc_outputs_class`` and
            sigmoid ``enc_outputs_coord_logits``; RT-DETR: ``enc_topk_logits`` and
            ``enc_topk_bboxes``).

    Returns:
        ``{route: {"pred_logits" [B, Q, K], "pred_boxes" [B, Q, 4], "aux_outputs": [...]}}``;
        RT-DETR's denoising queries are not included (transformers' own loss covers them).
        D-FINE / DEIMv2: every layer also holds ``"pred_corners"`` and ``"ref_points"`` and
        each route ``"pre_outputs"`` (the decoder's own predictions, sliced per route).

    Raises:
        TypeError: ``model`` is not the detector of a registered HF family.
    """
    family = _family(model)
    predictions = family.route_layer_predictions(model, outputs, model_output)
    extra = family.loss_inputs(model, outputs, model_output, predictions)
    for route in predictions.values():
        route.update(extra)
    return predictions
