"""``MultiRouteCriterion``: DETR set losses for every route, every decoder layer and the encoder.

Input layout (``R`` routes, ``L`` decoder layers, ``B`` images, ``Q_r`` queries of route ``r``,
``K`` classes, ``S`` encoder proposals)::

    outputs = {
        route_name: {
            "pred_logits": Tensor[B, Q_r, K],      # last decoder layer (layer L-1)
            "pred_boxes":  Tensor[B, Q_r, 4],      # cxcywh in [0, 1]
            "aux_outputs": [                        # optional: layers 0 .. L-2, in order
                {"pred_logits": Tensor[B, Q_r, K], "pred_boxes": Tensor[B, Q_r, 4]}, ...
            ],
            "enc_outputs": {                        # optional: two-stage encoder proposals
                "pred_logits": Tensor[B, S, K], "pred_boxes": Tensor[B, S, 4]},
        },
        ...
    }
    targets = [{"labels": Tensor[N_b] int64, "boxes": Tensor[N_b, 4] cxcywh}, ...]  # B dicts

Returned losses (a flat dict of 0-dim tensors): ``"{term}/{route}/layer{l}"`` for ``term`` in
``loss_class`` (sigmoid focal, or DETR's softmax cross entropy with a no-object class),
``loss_bbox`` (L1), ``loss_giou`` and ``l`` in ``0 .. L-1`` (the
last layer is ``layer{L-1}``), ``"{term}/{route}/enc"`` for encoder proposals, and ``"loss"``,
the weighted sum. Routes whose matcher is a group (``{"o2o": ..., "o2m": ...}``, e.g. a route with
supervision "both") get one set per label: ``"{term}/{route}:{label}/layer{l}"``. The individual
losses are unweighted; ``"loss" = sum(weight_dict[term] * route_weights[route] * (encoder_weight
if enc) * value)``.

Host reads: the matching of every route, layer and encoder set of a call, with the target
checks, reads the device once and writes the pairs back once (see
:mod:`mrdetr.matching.transfer` and :func:`mrdetr.matching.batch.match_all`).

Masks (instance segmentation, optional): with ``mask_loss`` set (e.g.
:class:`mrdetr.segmentation.MaskLoss`), every prediction set that holds ``"pred_masks":
Tensor[B, Q_r, h, w]`` (logits) also gets ``loss_mask`` (sigmoid BCE) and ``loss_dice`` on the
pairs its route's matcher chose (the primary route's Hungarian pairs, an auxiliary route's
one-to-many pairs); targets then hold ``"masks": Tensor[N_b, H, W]`` (bool, one canvas size for
the whole batch, e.g. the padded batch's). Sets without ``"pred_masks"`` get no mask terms.

Mixture of experts (optional): a route whose dict holds ``"loss_moe": Tensor[]`` (the
load-balancing loss, ``MultiRouteDecoderOutput.balance_losses[route]``) gets ``"loss_moe/{route}"``,
added to ``"loss"`` with ``weight_dict["loss_moe"]`` (default 0.01) times the route's weight.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .criterion_batch import grouped_set_losses
from .criterion_keys import KEY_STYLES, LossKeys, check_weights
from .losses import (
    CLASSIFICATIONS,
    giou_loss,
    l1_loss,
    matched_mask_losses,
    sigmoid_focal_loss,
    softmax_class_loss,
)
from .matching.box_format import check_format, format_flag
from .matching.indices import flatten_indices
from .matching.inputs import PackedTargets, pack_targets
from .matching.router import RouteMatcher
from .matching.sets import match_sets, prediction_sets, set_jobs

__all__ = ["DEFAULT_WEIGHTS", "MultiRouteCriterion"]

DEFAULT_WEIGHTS = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
"""The reference recipe: focal 2, L1 5, GIoU 2, for every route and decoder layer."""

_TERMS = tuple(DEFAULT_WEIGHTS)

MOE_WEIGHTS = {"loss_moe": 0.01}
"""Default weight of a route's mixture-of-experts load-balancing loss (Switch Transformer's)."""

MASK_WEIGHTS = {"loss_mask": 5.0, "loss_dice": 5.0}
"""Default weights of the mask terms (Mask2Former / Mask DINO): BCE 5, dice 5."""


class MultiRouteCriterion(nn.Module):
    """Set losses of a multi-route DETR (see the module docstring for the input layout).

    Args:
        num_classes: ``K``, the number of real classes. ``pred_logits`` has ``K`` logits with
            ``classification="sigmoid"`` and ``K + 1`` with ``"softmax"`` (the last is
            no-object).
        matcher: a :class:`~mrdetr.matching.RouteMatcher`, or a mapping ``{route_name: matcher
            or {label: matcher}}`` that is wrapped into one.
        weight_dict: weight per term; missing terms take :data:`DEFAULT_WEIGHTS`.
        route_weights: weight per route (default 1.0 for every route); every key must be a route
            of the matcher (checked here and again at every call, so a typo such as
            ``"aux_fn"`` raises instead of being ignored).
        encoder_weight: extra factor of the encoder-proposal losses (reference recipe: 3).
        focal_alpha, focal_gamma: focal loss parameters (``"sigmoid"``).
        classification: ``"sigmoid"`` (focal loss, Deformable-DETR / DINO) or ``"softmax"``
            (DETR: cross entropy over ``K`` classes + no-object, unmatched predictions are
            no-object with weight ``eos_coef``, the weighted mean over predictions, not divided
            by the gt count; see :func:`~mrdetr.losses.softmax_class_loss`). Give the matchers
            the same option (``RouteMatcher.for_routes(routes, classification="softmax")``).
        eos_coef: weight of the no-object class (``"softmax"``; DETR: 0.1).
        encoder_matcher: matcher for ``enc_outputs``; by default each route's own matcher.
        distributed: average the gt count over processes; ``None`` = when ``torch.distributed``
            is initialised.
        mask_loss: optional callable ``(pred_masks (Tensor[M, h, w]), target_masks (Tensor[M, H,
            W])) -> (bce (Tensor[M]), dice (Tensor[M]))``, e.g.
            :class:`mrdetr.segmentation.MaskLoss`; enables ``loss_mask`` / ``loss_dice`` (default
            weights :data:`MASK_WEIGHTS`).
        key_style: ``"mrdetr"`` (keys ``"{term}/{route}/layer{l}"`` and ``"loss"``, the total)
            or ``"detr"`` (``loss_ce``, ``loss_bbox_0``, ``loss_giou_aux_ffn``, ...: the keys of
            DETR / Deformable-DETR engines, with ``weight_dict`` the matching per-key weights;
            see :mod:`mrdetr.criterion_keys`).

    Weights: ``term_weights`` holds the weight per term. With ``key_style="mrdetr"``,
    ``weight_dict`` is that same dict; with ``"detr"`` it maps every loss key to its effective
    weight, filled by each forward, so that a DETR engine's ``sum(loss_dict[k] * weight_dict[k]
    for k in loss_dict if k in weight_dict)`` equals the weighted total.

    ``forward(outputs, targets) -> dict[str, Tensor]``. Every loss is normalised by the number of
    gt boxes of the batch (at least 1), averaged over processes when distributed, so that the
    mean over processes of the loss equals the single-process loss of the whole batch.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: RouteMatcher | Mapping,
        weight_dict: Mapping[str, float] | None = None,
        route_weights: Mapping[str, float] | None = None,
        encoder_weight: float = 3.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        encoder_matcher=None,
        distributed: bool | None = None,
        mask_loss=None,
        key_style: str = "mrdetr",
        classification: str = "sigmoid",
        eos_coef: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, received {num_classes!r}")
        if classification not in CLASSIFICATIONS:
            raise ValueError(
                f"classification must be one of {CLASSIFICATIONS}, received {classification!r}"
            )
        if (
            isinstance(eos_coef, bool)
            or not isinstance(eos_coef, numbers.Real)
            or not (0 <= eos_coef < math.inf)
        ):
            raise ValueError(f"eos_coef must be a finite number >= 0, received {eos_coef!r}")
        self.classification, self.eos_coef = classification, float(eos_coef)
        self.num_classes = num_classes
        self.matcher = matcher if isinstance(matcher, RouteMatcher) else RouteMatcher(matcher)
        if mask_loss is not None and not callable(mask_loss):
            raise ValueError(f"mask_loss must be callable, received {type(mask_loss).__name__}")
        self.mask_loss = mask_loss
        defaults = {
            **DEFAULT_WEIGHTS,
            **MOE_WEIGHTS,
            **(MASK_WEIGHTS if mask_loss is not None else {}),
        }
        if key_style not in KEY_STYLES:
            raise ValueError(f"key_style must be one of {KEY_STYLES}, received {key_style!r}")
        self.key_style = key_style
        self.term_weights = {**defaults, **(weight_dict or {})}
        self.weight_dict = self.term_weights if key_style == "mrdetr" else {}
        self.route_weights = dict(route_weights or {})
        self.encoder_weight = encoder_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.encoder_matcher = encoder_matcher
        self.distributed = distributed
        self.check_weights()

    def check_weights(self) -> None:
        """Raise a ``ValueError`` for a ``weight_dict`` term other than :data:`DEFAULT_WEIGHTS`'s,
        ``"loss_moe"`` (and :data:`MASK_WEIGHTS`' with ``mask_loss``), a ``route_weights`` key
        that is not a route of the matcher, or a weight that is not a finite number. Called at
        construction and by every ``forward`` (the dicts may have been edited in between)."""
        terms = (
            _TERMS
            + tuple(MOE_WEIGHTS)
            + (tuple(MASK_WEIGHTS) if self.mask_loss is not None else ())
        )
        routes = list(self.matcher)
        check_weights(self.term_weights, self.route_weights, routes, self.encoder_weight, terms)

    def num_boxes(self, packed: PackedTargets, device: torch.device) -> Tensor:
        """Number of gt boxes of the batch as a float ``Tensor[]``, averaged over processes when
        distributed, clamped at 1."""
        n = torch.full((), float(sum(packed.sizes)), device=device)  # no host-to-device copy
        use_dist = self.distributed
        if use_dist is None:
            use_dist = dist.is_available() and dist.is_initialized()
        if use_dist:
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1.0)

    def set_losses(
        self,
        out: Mapping[str, Tensor],
        packed: PackedTargets,
        indices: Sequence[tuple[Tensor, Tensor]],
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """``loss_class``, ``loss_bbox``, ``loss_giou`` of one prediction set ``out``
        (``pred_logits [B, Q, K]``, ``pred_boxes [B, Q, 4]``) matched by ``indices`` (per image
        ``(pred_idx [M_b], gt_idx [M_b])``) to the ``packed`` targets, each summed and divided by
        ``num_boxes`` (``loss_class`` with ``"softmax"``: DETR's weighted mean). A prediction
        matched to several gts is a positive of each of their classes and is regressed towards
        each of their boxes. The indices are validated
        (:func:`~mrdetr.matching.indices.flatten_indices`): an index outside ``[0, Q)`` or
        ``[0, N_b)`` raises a ``ValueError``."""
        q = out["pred_logits"].shape[1]
        who = "MultiRouteCriterion"
        flat = flatten_indices(indices, packed.sizes, q, out["pred_logits"].device, who)
        return self.flat_losses(out, packed, *flat, num_boxes)

    def flat_losses(
        self,
        out: Mapping[str, Tensor],
        packed: PackedTargets,
        image_idx: Tensor,
        pred_idx: Tensor,
        gt_idx: Tensor,
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """:meth:`set_losses` on validated flat indices (``Tensor[M]`` each, ``gt_idx`` into
        the concatenated targets), with no device read."""
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        labels = packed.labels[gt_idx]
        if self.classification == "softmax":
            loss_class = softmax_class_loss(logits, image_idx, pred_idx, labels, self.eos_coef)
        else:
            onehot = torch.zeros_like(logits)
            onehot[image_idx, pred_idx, labels] = 1.0
            loss_class = sigmoid_focal_loss(
                logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum"
            )
            loss_class = loss_class / num_boxes
        src = boxes[image_idx, pred_idx]
        tgt = packed.boxes[gt_idx].to(src.dtype)
        return {
            "loss_class": loss_class,
            "loss_bbox": l1_loss(src, tgt, reduction="sum") / num_boxes,
            "loss_giou": giou_loss(src, tgt, reduction="sum") / num_boxes,
        }

    def mask_set_losses(
        self,
        out: Mapping[str, Tensor],
        targets: Sequence[Mapping],
        indices: Sequence[tuple[Tensor, Tensor]],
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """``loss_mask`` and ``loss_dice`` of ``out["pred_masks"] (Tensor[B, Q, h, w])`` on the
        matched pairs ``indices`` against ``targets[b]["masks"] (Tensor[N_b, H, W])``, summed
        and divided by ``num_boxes`` (see :func:`~mrdetr.losses.matched_mask_losses`)."""
        return matched_mask_losses(self.mask_loss, out["pred_masks"], targets, indices, num_boxes)

    def _check_route(self, route: str, out) -> list[tuple[str, Mapping]]:
        """``[(suffix, prediction dict)]`` of a route: its layers, then its encoder output."""
        softmax = self.classification == "softmax"
        return prediction_sets(route, out, self.num_classes + softmax, softmax)

    def forward(self, outputs: Mapping[str, Mapping], targets: Sequence[Mapping]):
        """Losses of every route and layer; see the module docstring for the layout."""
        if not isinstance(outputs, Mapping) or not outputs:
            raise ValueError("MultiRouteCriterion: outputs must be a non-empty dict of routes")
        self.check_weights()
        routes = {route: self._check_route(route, out) for route, out in outputs.items()}
        first = next(iter(outputs.values()))
        b = first["pred_logits"].shape[0]
        like = first["pred_boxes"]
        who = "MultiRouteCriterion"
        packed = pack_targets(targets, b, self.num_classes, like, who, values=False)
        num_boxes = self.num_boxes(packed, like.device)

        jobs = set_jobs(routes, self.matcher, self.encoder_matcher)

        def check(flags: list[bool]) -> None:
            if flags[0]:
                check_format(packed, who)

        # every matching of the call: one device read, one write back (matching.transfer)
        sets_ = [(out, m) for *_, out, m in jobs]
        flags = [format_flag(packed)]
        found = match_sets(sets_, targets, packed, self.num_classes, who, flags, check)
        losses: dict[str, Tensor] = {}
        keys = LossKeys(self.key_style, next(iter(self.matcher)), self.weight_dict)
        total = like.new_zeros(())
        batched = iter(grouped_set_losses(  # every set's losses in one batched computation
            [(out, m.flat) for (*_, out, _), m in zip(jobs, found, strict=True)],
            packed.labels, packed.boxes, num_boxes, self.focal_alpha, self.focal_gamma,
            classification=self.classification, eos_coef=self.eos_coef,
        ))  # fmt: skip
        done = iter(zip(jobs, found, strict=True))
        for route, sets in routes.items():
            route_weight = self.route_weights.get(route, 1.0)
            for _ in range(sum(job[0] == route for job in jobs)):
                (_, suffix, label, out, _), match = next(done)
                scale = route_weight * (self.encoder_weight if suffix == "enc" else 1.0)
                terms = next(batched)
                if self.mask_loss is not None and out.get("pred_masks") is not None:
                    terms.update(self.mask_set_losses(out, targets, match.pairs, num_boxes))
                for term, value in terms.items():
                    w = self.term_weights[term] * scale
                    losses[keys.add(term, route, label, suffix, sets, w)] = value
                    total = total + w * value
            moe = outputs[route].get("loss_moe")
            if moe is not None:
                if not isinstance(moe, Tensor) or moe.dim() != 0:
                    got = tuple(moe.shape) if isinstance(moe, Tensor) else type(moe).__name__
                    raise ValueError(
                        f"MultiRouteCriterion: outputs[{route!r}]['loss_moe'] must be a 0-dim "
                        f"tensor (MultiRouteDecoderOutput.balance_losses[route]), received {got}"
                    )
                w = self.term_weights["loss_moe"] * route_weight
                losses[keys.add("loss_moe", route, None, "", sets, w)] = moe
                total = total + self.term_weights["loss_moe"] * route_weight * moe
        if self.key_style == "mrdetr":
            losses["loss"] = total
        return losses
