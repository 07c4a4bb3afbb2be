"""The target box format check: normalised cxcywh, the commonest mistake in DETR codebases.

DETR losses expect target boxes as ``(cx, cy, w, h)`` in fractions of the image size, every value
in ``[0, 1]``. Pixel boxes (``xyxy`` or ``xywh`` from a COCO file, not divided by the image size)
do not fail anywhere: the L1 loss becomes huge (tens of thousands instead of tens) and training
goes wrong without a word. :func:`format_flag` detects values outside ``[0, 1]`` on the device
(read with the matching's costs, see :mod:`~mrdetr.matching.transfer`); :func:`check_format`
names the image, the box and the likely cause.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import PackedTargets

__all__ = ["TOLERANCE", "check_format", "format_flag"]

TOLERANCE = 1e-3
"""Slack beyond ``[0, 1]`` allowed for rounding (a box one pixel outside a 1000-pixel image)."""


def _outside(boxes: Tensor) -> Tensor:
    return ((boxes < -TOLERANCE) | (boxes > 1 + TOLERANCE)).any(-1)


def format_flag(packed: PackedTargets) -> Tensor:
    """A device ``bool Tensor[]``: True when a target box has a value outside ``[0, 1]`` (beyond
    :data:`TOLERANCE`), i.e. is not normalised cxcywh (no host read)."""
    if packed.boxes.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=packed.boxes.device)
    return _outside(packed.boxes).any()


def check_format(packed: PackedTargets, who: str) -> None:
    """Raise a ``ValueError`` for the first box :func:`format_flag` objects to, naming its image,
    the expected format and what was found (reads the device); return when there is none."""
    bad = _outside(packed.boxes)
    if packed.boxes.numel() == 0 or not bool(bad.any()):
        return
    j = int(bad.nonzero()[0, 0])
    image = packed.image_of(j)
    box = [round(v, 4) for v in packed.boxes[j].tolist()]
    start = sum(packed.sizes[:image])
    own = packed.boxes[start : start + packed.sizes[image]]
    hint = "pixel coordinates? divide x and w by the image width, y and h by its height"
    if box[2] > box[0] and box[3] > box[1] and bool((own[:, 2:] > own[:, :2]).all()):
        hint += (
            "; every box of the image has its 3rd value above the 1st and 4th above the 2nd, "
            "as xyxy corners do: convert with mrdetr.boxes.box_xyxy_to_cxcywh"
        )
    raise ValueError(
        f"{who}: image {image}: target 'boxes' must be normalised cxcywh (centre x, centre y, "
        f"width, height as fractions of the image size, every value in [0, 1]), received "
        f"{box} (box {j - start} of the image; values from {float(own.min()):.4g} to "
        f"{float(own.max()):.4g}): {hint}"
    )
