"""Post-processing of mask predictions to COCO results (RLE) and mask AP with pycocotools.

pycocotools is an optional dependency (the ``demo`` extra); these functions import it on call
and raise an ``ImportError`` saying how to install it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["encode_rle", "evaluate_coco", "masks_to_coco_results", "resize_mask_logits"]


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "mrdetr.segmentation needs pycocotools for RLE and mask AP: pip install 'mrdetr[demo]'"
        ) from e
    return mask_utils


def resize_mask_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``logits (Tensor[..., h, w])`` to ``size = (H, W)`` -> ``Tensor[..., H,
    W]`` (``align_corners=False``: the normalised coordinates of the mask head)."""
    lead = logits.shape[:-2]
    x = logits.reshape(-1, 1, *logits.shape[-2:])  # [prod(lead), 1, h, w]
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *x.shape[-2:])


def encode_rle(masks: Tensor) -> list[dict]:
    """COCO RLEs (``{"size": [H, W], "counts": str}``) of ``masks (Tensor[M, H, W], bool)``."""
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"encode_rle: masks must be a Tensor[M, H, W], received {got}")
    mask_utils = _mask_utils()
    arr = np.asfortranarray(masks.detach().to("cpu", torch.uint8).numpy().transpose(1, 2, 0))
    rles = mask_utils.encode(arr)  # pycocotools wants [H, W, M] Fortran order
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def masks_to_coco_results(
    mask_logits: Tensor,
    scores: Tensor,
    labels: Tensor,
    image_ids: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    boxes: Tensor | None = None,
    threshold: float = 0.5,
    category_ids: Sequence[int] | None = None,
) -> list[dict]:
    """COCO result dicts with RLE segmentations, one per prediction.

    Args:
        mask_logits (Tensor[B, K, h, w]): mask logits of the ``K`` kept predictions per image
            (e.g. the top-k of a DETR post-processor).
        scores (Tensor[B, K]), labels (Tensor[B, K], int): their scores and class indices.
        image_ids: ``B`` COCO image ids.
        image_sizes: ``B`` pairs ``(H, W)``: masks are resized to the image, then thresholded.
        boxes (Tensor[B, K, 4], optional): xywh boxes in pixels, added as ``"bbox"``.
        threshold: probability threshold of a mask pixel.
        category_ids: COCO category id of each class index (default: the index itself).

    Returns:
        A list of ``{"image_id", "category_id", "score", "segmentation"[, "bbox"]}``.
    """
    if mask_logits.dim() != 4 or tuple(scores.shape) != tuple(mask_logits.shape[:2]):
        raise ValueError(
            f"masks_to_coco_results: mask_logits must be [B, K, h, w] and scores [B, K], "
            f"received {tuple(mask_logits.shape)} and {tuple(scores.shape)}"
        )
    if len(image_ids) != mask_logits.shape[0] or len(image_sizes) != mask_logits.shape[0]:
        raise ValueError(
            f"masks_to_coco_results: need B={mask_logits.shape[0]} image_ids and image_sizes, "
            f"received {len(image_ids)} and {len(image_sizes)}"
        )
    results = []
    for b, (image_id, size) in enumerate(zip(image_ids, image_sizes, strict=True)):
        masks = resize_mask_logits(mask_logits[b].float(), size).sigmoid() > threshold
        rles = encode_rle(masks)
        for k, rle in enumerate(rles):
            label = int(labels[b, k])
            det = {
                "image_id": int(image_id),
                "category_id": int(category_ids[label]) if category_ids is not None else label,
                "score": float(scores[b, k]),
                "segmentation": rle,
            }
            if boxes is not None:
                det["bbox"] = [float(v) for v in boxes[b, k]]
            results.append(det)
    return results


def evaluate_coco(coco_gt, results: list[dict], iou_type: str = "segm") -> np.ndarray:
    """COCO AP of ``results`` against ``coco_gt`` (a ``pycocotools.coco.COCO``) with ``iou_type``
    ``"segm"`` (mask AP) or ``"bbox"``; returns COCOeval's 12 summary stats (``stats[0]`` = AP).
    No result gives all zeros (pycocotools cannot load an empty result list)."""
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"evaluate_coco: iou_type must be 'segm' or 'bbox', received {iou_type!r}")
    _mask_utils()
    if not results:
        return np.zeros(12)
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)
