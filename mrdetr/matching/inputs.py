"""Validation and packing of DETR-style predictions and targets, shared by matchers and criterion.

Predictions: ``{"pred_logits": Tensor[B, Q, K], "pred_boxes": Tensor[B, Q, 4]}`` (cxcywh).
Targets: a list of ``B`` dicts ``{"labels": int Tensor[N_b], "boxes": Tensor[N_b, 4]}`` (cxcywh in
``[0, 1]``), on the predictions' device. Every failure is a ``ValueError`` naming the image index
and the field, with what was expected and what was received. Value checks (label range, finite
boxes) run on the concatenated targets, so they cost one device sync per call, not one per image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PackedTargets", "check_predictions", "check_values", "pack_targets", "value_flags"]


def check_predictions(outputs: Mapping, who: str) -> tuple[Tensor, Tensor]:
    """Return ``(pred_logits (Tensor[B, Q, K]), pred_boxes (Tensor[B, Q, 4]))`` of ``outputs``
    after checking keys, ranks, shapes, dtypes and devices; ``who`` prefixes error messages."""
    if not isinstance(outputs, Mapping):
        raise ValueError(f"{who}: outputs must be a dict, received {type(outputs).__name__}")
    for key in ("pred_logits", "pred_boxes"):
        if key not in outputs:
            raise ValueError(f"{who}: outputs has no {key!r} (keys: {sorted(outputs)})")
        t = outputs[key]
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 3:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{who}: outputs[{key!r}] must be a floating [B, Q, *], received {got}"
            )
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if boxes.shape[-1] != 4 or boxes.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"{who}: outputs['pred_boxes'] must be [B, Q, 4] = {[*logits.shape[:2], 4]}, "
            f"received {list(boxes.shape)}"
        )
    if boxes.device != logits.device:
        raise ValueError(
            f"{who}: outputs['pred_boxes'] is on {boxes.device}, pred_logits on {logits.device}"
        )
    return logits, boxes


@dataclass
class PackedTargets:
    """Targets of a batch, validated and concatenated.

    Attributes:
        labels (Tensor[T]): int64 labels of all images, image after image (``T = sum(sizes)``).
        boxes (Tensor[T, 4]): cxcywh boxes, same order, in the predictions' dtype.
        sizes (list[int]): number of gts ``N_b`` of each image.
    """

    labels: Tensor
    boxes: Tensor
    sizes: list[int]

    @property
    def max_size(self) -> int:
        """Largest number of gts of one image (0 for an empty batch)."""
        return max(self.sizes, default=0)

    def padded(self) -> tuple[Tensor, Tensor, Tensor]:
        """Pad to ``(labels (Tensor[B, N], int64), boxes (Tensor[B, N, 4]), mask (Tensor[B, N],
        bool))`` with ``N = max_size``; padding has label 0, box 0 and mask False."""
        b, n = len(self.sizes), self.max_size
        if b == 0 or n == 0:
            mask = torch.zeros(b, n, dtype=torch.bool, device=self.labels.device)
            return self.labels.new_zeros(b, n), self.boxes.new_zeros(b, n, 4), mask
        pad = torch.nn.utils.rnn.pad_sequence  # no device read (boolean-mask indexing has one)
        ones = torch.ones(self.labels.shape[0], dtype=torch.bool, device=self.labels.device)
        return tuple(
            pad(list(t.split(self.sizes)), batch_first=True)
            for t in (self.labels, self.boxes, ones)
        )

    def image_of(self, flat_index: int) -> int:
        """Image index of the ``flat_index``-th concatenated target."""
        total = 0
        for i, n in enumerate(self.sizes):
            total += n
            if flat_index < total:
                return i
        raise IndexError(flat_index)


def pack_targets(
    targets: Sequence[Mapping],
    batch_size: int,
    num_classes: int,
    like: Tensor,
    who: str,
    values: bool = True,
) -> PackedTargets:
    """Validate ``targets`` against a batch of ``batch_size`` images, ``num_classes`` classes and
    the device / dtype of ``like`` (the predicted boxes), and concatenate them. With ``values``
    False the value checks (one device read) are left to the caller: :func:`value_flags`, read
    with other data, then :func:`check_values` when it is set."""
    if isinstance(targets, Mapping) or not isinstance(targets, Sequence):
        raise ValueError(
            f"{who}: targets must be a list of dicts, received {type(targets).__name__}"
        )
    if len(targets) != batch_size:
        raise ValueError(
            f"{who}: expected {batch_size} targets (one per image, B = {batch_size}), "
            f"received {len(targets)}"
        )
    labels, boxes, sizes = [], [], []
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "labels" not in t or "boxes" not in t:
            raise ValueError(f"{who}: targets[{i}] must be a dict with 'labels' and 'boxes'")
        lab, box = t["labels"], t["boxes"]
        if not isinstance(lab, Tensor) or lab.dim() != 1 or lab.is_floating_point():
            got = f"{lab.dtype} {tuple(lab.shape)}" if isinstance(lab, Tensor) else type(lab)
            raise ValueError(f"{who}: image {i}: 'labels' must be an int64 [N], received {got}")
        if lab.dtype == torch.bool or lab.is_complex():
            raise ValueError(f"{who}: image {i}: 'labels' must be int64, received {lab.dtype}")
        if not isinstance(box, Tensor) or box.shape != (lab.shape[0], 4):
            got = tuple(box.shape) if isinstance(box, Tensor) else type(box).__name__
            raise ValueError(
                f"{who}: image {i}: 'boxes' must be [N, 4] = [{lab.shape[0]}, 4] to match "
                f"'labels', received {got}"
            )
        if not box.is_floating_point():
            raise ValueError(f"{who}: image {i}: 'boxes' must be floating, received {box.dtype}")
        for name, x in (("labels", lab), ("boxes", box)):
            if x.device != like.device:
                raise ValueError(
                    f"{who}: image {i}: '{name}' is on {x.device}, predictions on {like.device}"
                )
        labels.append(lab)
        boxes.append(box)
        sizes.append(lab.shape[0])
    if batch_size == 0:
        flat_labels = torch.zeros(0, dtype=torch.int64, device=like.device)
        flat_boxes = like.new_zeros(0, 4)
    else:
        flat_labels = torch.cat(labels).long()
        flat_boxes = torch.cat(boxes).to(like.dtype)
    packed = PackedTargets(flat_labels, flat_boxes, sizes)
    if values:
        check_values(packed, num_classes, who)
    return packed


def _bad_values(packed: PackedTargets, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    bad_label = (packed.labels < 0) | (packed.labels >= num_classes)
    bad_box = ~torch.isfinite(packed.boxes).all(-1)
    negative = (packed.boxes[:, 2:] < 0).any(-1)
    return bad_label, bad_box, negative


def value_flags(packed: PackedTargets, num_classes: int) -> Tensor:
    """A device ``bool Tensor[]``: True when a label is outside ``[0, num_classes)``, a box is
    not finite or has a negative width or height (no host read)."""
    if packed.labels.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=packed.labels.device)
    bad_label, bad_box, negative = _bad_values(packed, num_classes)
    return (bad_label | bad_box | negative).any()


def check_values(packed: PackedTargets, num_classes: int, who: str) -> None:
    """Raise a ``ValueError`` naming the image and the value for the first check of
    :func:`value_flags` that fails (reads the device); return when none does."""
    if packed.labels.numel() == 0:
        return
    bad_label, bad_box, negative = _bad_values(packed, num_classes)
    if not bool((bad_label | bad_box | negative).any()):  # one sync for all checks
        return
    if bool(bad_label.any()):
        j = int(bad_label.nonzero()[0, 0])
        raise ValueError(
            f"{who}: image {packed.image_of(j)}: 'labels' must be in [0, {num_classes}), "
            f"received {int(packed.labels[j])}"
        )
    if bool(bad_box.any()):
        j = int(bad_box.nonzero()[0, 0])
        raise ValueError(
            f"{who}: image {packed.image_of(j)}: 'boxes' must be finite, received "
            f"{packed.boxes[j].tolist()}"
        )
    j = int(negative.nonzero()[0, 0])
    raise ValueError(
        f"{who}: image {packed.image_of(j)}: 'boxes' (cxcywh) must have width and height >= 0, "
        f"received {packed.boxes[j].tolist()}"
    )
