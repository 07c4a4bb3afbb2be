"""Detection data for the toy demo: a seeded synthetic shapes dataset and COCO-format files.

``make_dataset(num_images, image_size, seed)`` draws images with numpy (4 shape classes, varied
sizes and colours, overlaps, gradient backgrounds with line / dot clutter and noise) and keeps
every instance's exact binary mask; its boxes are the masks' tight bounding boxes.
``toy.coco.load_coco(ann_file, image_dir, image_size)`` reads a user's COCO instances json and
image folder into the same :class:`DetectionData`. ``write_coco`` writes a dataset out (PNG images +
instances json with RLE masks), so the synthetic data doubles as an example of the user format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["CLASSES", "DetectionData", "batch", "make_dataset", "mask_boxes", "write_coco"]

CLASSES = ("rectangle", "ellipse", "triangle", "ring")


@dataclass
class DetectionData:
    """Images resized to one square size plus their annotations.

    Attributes:
        images (np.ndarray[N, S, S, 3], uint8): the images, resized to ``S = image_size``.
        boxes (list of np.ndarray[n_i, 4], float32): normalised ``(cx, cy, w, h)`` per image.
        labels (list of np.ndarray[n_i], int64): contiguous labels ``0 .. K-1``.
        coco (dict): the COCO instances dict (original image sizes and category ids), the
            ground truth of the evaluation.
        image_ids (list of int): COCO image id of every image.
        category_ids (list of int): COCO category id of every label.
        masks (list of np.ndarray[n_i, S, S], bool) or None: exact instance masks (synthetic
            data only).
    """

    images: np.ndarray
    boxes: list
    labels: list
    coco: dict
    image_ids: list
    category_ids: list
    masks: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """``K``, the number of categories."""
        return len(self.category_ids)


def _shape_mask(kind: int, yy, xx, cx, cy, w, h, rng) -> np.ndarray:
    """Boolean mask of one shape of class ``kind`` inside the box centred at (cx, cy)."""
    dx, dy = (xx - cx) / (w / 2), (yy - cy) / (h / 2)
    if kind == 0:  # rectangle
        return (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
    if kind == 1:  # ellipse
        return dx**2 + dy**2 <= 1
    if kind == 2:  # triangle, apex up or down
        t = (dy + 1) / 2 if rng.random() < 0.5 else (1 - dy) / 2
        return (np.abs(dy) <= 1) & (np.abs(dx) <= t)
    r = dx**2 + dy**2  # ring
    return (r <= 1) & (r >= rng.uniform(0.25, 0.45))


def _background(size: int, rng) -> np.ndarray:
    """Gradient background with clutter lines and dots; float32 ``[S, S, 3]`` in [0, 1]."""
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    a, b = rng.uniform(0.1, 0.9, 3), rng.uniform(-0.3, 0.3, 3)
    img = a + b * (ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None])
    img = np.broadcast_to(img, (size, size, 3)).copy()
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(1, 4)):  # thin lines
        x0, y0, ang = *rng.uniform(0, size, 2), rng.uniform(0, np.pi)
        d = np.abs((xx - x0) * np.sin(ang) - (yy - y0) * np.cos(ang))
        img[d < 0.7] = rng.uniform(0, 1, 3)
    for _ in range(rng.integers(3, 10)):  # dots
        x0, y0 = rng.uniform(0, size, 2)
        img[(xx - x0) ** 2 + (yy - y0) ** 2 < rng.uniform(1, 4)] = rng.uniform(0, 1, 3)
    return img


def _draw(size: int, rng, max_objects: int, min_frac: float, max_frac: float):
    """One image: ``(uint8 [S, S, 3], masks [n, S, S] bool, labels [n])``."""
    img = _background(size, rng)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    masks, labels, boxes = [], [], []
    target = int(rng.integers(1, max_objects + 1))
    for _ in range(50):
        if len(masks) >= target:
            break
        w, h = rng.uniform(min_frac, max_frac, 2) * size
        cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if boxes and _max_iou(box, np.array(boxes)) > 0.35:
            continue
        kind = int(rng.integers(len(CLASSES)))
        m = _shape_mask(kind, yy, xx, cx, cy, w, h, rng)
        if m.sum() < 12:
            continue
        img[m] = rng.uniform(0, 1, 3)
        for prev in masks:  # later shapes occlude earlier ones
            prev &= ~m
        masks.append(m)
        labels.append(kind)
        boxes.append(box)
    keep = [i for i, m in enumerate(masks) if m.sum() >= 8]
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    masks = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, size, size), bool)
    return (img * 255).astype(np.uint8), masks, np.array([labels[i] for i in keep], np.int64)


def _max_iou(box: np.ndarray, others: np.ndarray) -> float:
    lt, rb = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return float((inter / (area(box) + area(others) - inter)).max())


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight pixel boxes ``(x0, y0, w, h)`` of ``masks [n, S, S]``; float32 ``[n, 4]``."""
    out = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        out[i] = xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
    return out


def make_dataset(
    num_images: int,
    image_size: int = 96,
    seed: int = 0,
    *,
    max_objects: int = 8,
    min_frac: float = 0.09,
    max_frac: float = 0.45,
) -> DetectionData:
    """A seeded synthetic shapes dataset (same ``seed`` -> same images).

    Args:
        num_images: images to draw.
        image_size: side ``S`` in pixels.
        seed: numpy seed of the split (use different seeds for train and val).
        max_objects: at most this many shapes per image (at least one).
        min_frac, max_frac: shape width / height as a fraction of ``S``.

    Returns:
        :class:`DetectionData` with exact masks; its COCO dict carries RLE segmentations.
    """
    from pycocotools import mask as mask_utils

    for name, v in (("num_images", num_images), ("image_size", image_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    rng = np.random.default_rng(seed)
    images, boxes, labels, masks, anns, infos = [], [], [], [], [], []
    for i in range(num_images):
        img, m, lab = _draw(image_size, rng, max_objects, min_frac, max_frac)
        xywh = mask_boxes(m)
        images.append(img)
        masks.append(m)
        labels.append(lab)
        boxes.append(xywh_to_cxcywh(xywh, image_size, image_size))
        infos.append(
            {"id": i + 1, "file_name": f"{i:06d}.png", "height": image_size, "width": image_size}
        )
        for j in range(len(lab)):
            rle = mask_utils.encode(np.asfortranarray(m[j].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(lab[j]) + 1,
                    "bbox": [float(v) for v in xywh[j]],
                    "area": float(m[j].sum()),
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]
    coco = {"images": infos, "annotations": anns, "categories": cats}
    return DetectionData(
        np.stack(images),
        boxes,
        labels,
        coco,
        [i["id"] for i in infos],
        [c["id"] for c in cats],
        masks,
    )


def xywh_to_cxcywh(xywh: np.ndarray, width: float, height: float) -> np.ndarray:
    """Pixel ``(x0, y0, w, h)`` -> normalised ``(cx, cy, w, h)``; float32 ``[n, 4]``."""
    xywh = np.asarray(xywh, np.float32).reshape(-1, 4)
    scale = np.array([width, height, width, height], np.float32)
    return np.concatenate([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], 1) / scale


def write_coco(data: DetectionData, folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``data`` as ``folder/name.json`` + images under ``folder/name/``; returns both."""
    from PIL import Image

    folder = Path(folder)
    image_dir = folder / name
    image_dir.mkdir(parents=True, exist_ok=True)
    for info, img in zip(data.coco["images"], data.images, strict=True):
        Image.fromarray(img).save(image_dir / info["file_name"])
    ann = folder / f"{name}.json"
    ann.write_text(json.dumps(data.coco))
    return ann, image_dir


def batch(data: DetectionData, indices, flips=None) -> tuple[torch.Tensor, list[dict]]:
    """Images ``Tensor[B, 3, S, S]`` (float, normalised) and targets for ``indices``.

    ``flips`` (optional bools, one per index) mirrors images and boxes horizontally.
    """
    imgs, targets, mask_list = [], [], []
    for j, i in enumerate(indices):
        img, box = data.images[i], data.boxes[i].copy()
        masks = None if data.masks is None else data.masks[i]  # [n, S, S] bool (synthetic data)
        if flips is not None and flips[j]:
            img, box[:, 0] = img[:, ::-1], 1.0 - box[:, 0]
            masks = None if masks is None else masks[:, :, ::-1]
        mask_list.append(masks)
        imgs.append(torch.from_numpy(np.ascontiguousarray(img)))
        targets.append({"labels": torch.from_numpy(data.labels[i]), "boxes": torch.from_numpy(box)})
    for t, masks in zip(targets, mask_list, strict=True):
        if masks is not None:
            t["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
    x = torch.stack(imgs).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25, targets
