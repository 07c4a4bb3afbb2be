"""How each HF transformers detector family's own loss function is called: one table.

A family's loss function is ``LOSS_MAPPING[model.loss_type]`` (``model.loss_function``); the
model calls it as ``loss_function(logits, labels, device, pred_boxes, config, outputs_class,
outputs_coord, *encoder, **keywords) -> (loss, loss_dict, auxiliary_outputs)``. Every entry of
:data:`FAMILIES` says, for the families sharing one loss function:

- ``loss_types``: the ``model.loss_type`` values (the ``LOSS_MAPPING`` keys) it covers;
- ``matcher_sites``: ``(module of transformers.loss, global name)`` where the loss function looks
  up its Hungarian matcher class when it builds the matcher (replaced by
  :func:`mrdetr.adapters.host_loss.host_route_loss`);
- ``layer_dim``: the axis of the decoder-layer stack in ``outputs_class`` / ``outputs_coord`` (0:
  ``[L, B, Q, K]``, DETR style; 1: ``[B, L, Q, K]``, RT-DETR style);
- ``encoder``: how encoder proposals reach the loss: ``"none"`` (not supervised by the loss),
  ``"topk"`` (keywords ``enc_topk_logits`` / ``enc_topk_bboxes``, supervised after the decoder
  layers as ``*_aux_{L-1}``) or ``"positional"`` (LW-DETR: the 8th and 9th arguments,
  supervised as ``*_enc``) or ``"keywords"`` (Grounding DINO: ``encoder_logits`` /
  ``encoder_pred_boxes``, supervised as ``*_enc``);
- ``text_inputs``: keys of the route's predictions passed positionally after ``config``
  (Grounding DINO: ``label_maps``, ``text_mask``, built from the prompt);
- ``layer_extras``: per-layer prediction keys stacked like ``outputs_class`` and passed as
  keywords (D-FINE / DEIM: ``pred_corners`` -> ``predicted_corners``, ``ref_points`` ->
  ``initial_reference_points``);
- ``pre_layer``: key of a route's prediction stacked before layer 0 in ``outputs_class`` /
  ``outputs_coord`` when the route holds it (D-FINE / DEIM: ``"pre_outputs"``, the
  ``pre_bbox_head`` prediction their decoders put first in training), as the model passes them;
- ``total``: ``"sum"`` (``loss_dict`` values are weighted, ``loss = sum(values)``) or
  ``"weighted"`` (``loss = sum(term_weights[term] * value)``, with ``term_weights``);
- ``class_score``: the classification the family's matcher uses (:data:`CLASS_SCORES`);
- ``group_detr``: the loss matches ``config.group_detr`` query groups separately.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FAMILIES", "HostLossFamily", "family_of"]


def _sigmoid(config) -> str:
    return "sigmoid"


def _softmax_no_object(config) -> str:
    return "softmax_no_object"


def _focal_flag(config) -> str:
    return "sigmoid" if getattr(config, "use_focal_loss", True) else "softmax"


def _detr_weights(config) -> dict[str, float]:
    return {
        "loss_ce": getattr(config, "class_loss_coefficient", 1.0),
        "loss_bbox": config.bbox_loss_coefficient,
        "loss_giou": config.giou_loss_coefficient,
    }


def _text_tokens(config) -> str:
    return "text_tokens"


def _grounding_weights(config) -> dict[str, float]:
    return {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient,
            "loss_giou": config.giou_loss_coefficient}  # fmt: skip


def _unit_weights(config) -> dict[str, float]:
    return {}  # every value is already weighted: weight 1


@dataclass(frozen=True)
class HostLossFamily:
    """One row of :data:`FAMILIES` (see the module docstring for the fields)."""

    name: str
    loss_types: tuple[str, ...]
    matcher_sites: tuple[tuple[str, str], ...]
    layer_dim: int
    encoder: str
    total: str
    class_score: Callable[[object], str]
    layer_extras: tuple[tuple[str, str], ...] = ()
    group_detr: bool = False
    pre_layer: str | None = None
    text_inputs: tuple[str, ...] = ()
    term_weights: Callable[[object], dict[str, float]] = _unit_weights

    def encoder_key(self, key: str, num_layers: int) -> bool:
        """Whether ``loss_dict`` key ``key`` is the encoder proposals' term (``num_layers``
        decoder layers)."""
        if self.encoder == "topk":
            return key.endswith(f"_aux_{num_layers - 1}")
        if self.encoder in ("positional", "keywords"):
            return key.endswith("_enc")
        return False

    def weight(self, key: str, config) -> float:
        """Weight of ``loss_dict[key]`` in the family's total (0 for logged-only terms)."""
        if self.total == "sum":
            return 1.0
        term = re.sub(r"(_\d+|_enc)$", "", key)
        return float(self.term_weights(config).get(term, 0.0))


_DETR_SITE = (("loss_for_object_detection", "HungarianMatcher"),)
_RT_DETR_SITE = (("loss_rt_detr", "RTDetrHungarianMatcher"),)

FAMILIES: tuple[HostLossFamily, ...] = (
    HostLossFamily(
        name="detr",
        loss_types=("ForObjectDetection", "DetrForObjectDetection"),
        matcher_sites=_DETR_SITE,
        layer_dim=0,
        encoder="none",
        total="weighted",
        term_weights=_detr_weights,
        class_score=_softmax_no_object,
    ),
    HostLossFamily(
        name="deformable_detr",
        loss_types=(
            "DeformableDetrForObjectDetection",
            "ConditionalDetrForObjectDetection",
            "DabDetrForObjectDetection",
        ),
        matcher_sites=(("loss_deformable_detr", "DeformableDetrHungarianMatcher"),),
        layer_dim=0,
        encoder="none",
        total="weighted",
        term_weights=_detr_weights,
        class_score=_sigmoid,
    ),
    HostLossFamily(
        name="rt_detr",
        loss_types=("RTDetrForObjectDetection", "RTDetrV2ForObjectDetection"),
        matcher_sites=_RT_DETR_SITE,
        layer_dim=1,
        encoder="topk",
        total="sum",
        class_score=_focal_flag,
    ),
    HostLossFamily(
        name="d_fine",
        loss_types=("DFineForObjectDetection", "Deimv2ForObjectDetection"),
        matcher_sites=_RT_DETR_SITE + (("loss_d_fine", "RTDetrHungarianMatcher"),),
        layer_dim=1,
        encoder="topk",
        total="sum",
        class_score=_focal_flag,
        layer_extras=(
            ("pred_corners", "predicted_corners"),
            ("ref_points", "initial_reference_points"),
        ),
        pre_layer="pre_outputs",
    ),
    HostLossFamily(
        name="lw_detr",
        loss_types=("LwDetrForObjectDetection", "RfDetrForObjectDetection"),
        matcher_sites=(("loss_lw_detr", "LwDetrHungarianMatcher"),),
        layer_dim=0,
        encoder="positional",
        total="weighted",
        term_weights=_detr_weights,
        class_score=_sigmoid,
        group_detr=True,
    ),
    HostLossFamily(
        name="grounding_dino",
        loss_types=("GroundingDinoForObjectDetection", "MMGroundingDinoForObjectDetection"),
        matcher_sites=(("loss_grounding_dino", "GroundingDinoHungarianMatcher"),),
        layer_dim=0,
        encoder="keywords",
        total="weighted",
        term_weights=_grounding_weights,
        class_score=_text_tokens,
        text_inputs=("label_maps", "text_mask"),
    ),
)
"""The families whose own loss :func:`~mrdetr.adapters.host_loss.host_route_loss` can call. Not
here: ``omdet_turbo`` (no training loss in transformers) and the segmentation heads."""


def family_of(model) -> HostLossFamily:
    """The :data:`FAMILIES` row of an HF detector, from ``model.loss_type`` (set by transformers
    from the class name), else the class name. Raises ``ValueError`` naming the model's loss
    type and the supported ones."""
    loss_type = getattr(model, "loss_type", None) or type(model).__name__
    names = (loss_type, type(model).__name__)
    for family in FAMILIES:
        if any(n in family.loss_types for n in names):
            return family
    supported = sorted(t for f in FAMILIES for t in f.loss_types)
    raise ValueError(
        f"model: no host-loss family for loss_type {loss_type!r} ({type(model).__name__}); "
        f"supported: {supported}"
    )
