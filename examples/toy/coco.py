"""A user's COCO instances json + image folder as :class:`~toy.data.DetectionData`, with clear
errors (naming the file) for a missing or malformed annotation file, image folder or image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import DetectionData, xywh_to_cxcywh

__all__ = ["load_coco"]


def load_coco(ann_file: str | Path, image_dir: str | Path, image_size: int) -> DetectionData:
    """Read a COCO instances json and its image folder, resizing images to ``image_size``.

    Boxes stay normalised to the original size, so predictions map back exactly; crowd
    annotations and boxes without area are ignored for training (kept for evaluation).

    Raises:
        FileNotFoundError: the annotation file or image folder (or an image) is missing.
        ValueError: the annotation file is not valid json or misses COCO keys, naming the file.
    """
    from PIL import Image

    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"annotation file {ann_file} does not exist (expected a COCO instances json)"
        )
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"image folder {image_dir} does not exist (expected the folder "
            f"that the file_names of {ann_file} are relative to)"
        )
    try:
        coco = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {ann_file} is not valid json: {e}") from None
    _check_coco(coco, ann_file)
    cat_ids = sorted(c["id"] for c in coco["categories"])
    label_of = {c: i for i, c in enumerate(cat_ids)}
    per_image: dict[int, list] = {img["id"]: [] for img in coco["images"]}
    for a in coco["annotations"]:
        if a["image_id"] not in per_image or a["category_id"] not in label_of:
            raise ValueError(
                f"annotation file {ann_file}: annotation {a.get('id')} refers to an "
                f"unknown image_id {a['image_id']} or category_id "
                f"{a['category_id']}"
            )
        if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0:
            per_image[a["image_id"]].append(a)
    images, boxes, labels = [], [], []
    for info in coco["images"]:
        path = image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} listed in {ann_file} does not exist")
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB").resize((image_size, image_size))))
        w, h = info.get("width") or im.width, info.get("height") or im.height
        info.setdefault("width", w)
        info.setdefault("height", h)
        anns = per_image[info["id"]]
        boxes.append(xywh_to_cxcywh([a["bbox"] for a in anns], w, h).clip(0, 1))
        labels.append(np.array([label_of[a["category_id"]] for a in anns], np.int64))
    for a in coco["annotations"]:
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        a.setdefault("iscrowd", 0)
    return DetectionData(
        np.stack(images), boxes, labels, coco, [i["id"] for i in coco["images"]], cat_ids
    )


def _check_coco(coco, ann_file: Path) -> None:
    """Raise ``ValueError`` naming ``ann_file`` unless ``coco`` has the COCO instances keys."""
    if not isinstance(coco, dict):
        raise ValueError(
            f"annotation file {ann_file}: expected a COCO instances dict, got {type(coco).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            found = type(coco.get(key)).__name__
            raise ValueError(
                f"annotation file {ann_file}: expected a list under {key!r} (COCO "
                f"instances format), found {found}"
            )
    if not coco["images"] or not coco["categories"]:
        raise ValueError(f"annotation file {ann_file}: 'images' and 'categories' must not be empty")
    needs = {
        "images": ("id", "file_name"),
        "categories": ("id",),
        "annotations": ("image_id", "category_id", "bbox"),
    }
    for key, fields in needs.items():
        for i, item in enumerate(coco[key]):
            missing = [f for f in fields if not isinstance(item, dict) or f not in item]
            if missing:
                raise ValueError(f"annotation file {ann_file}: {key}[{i}] lacks {missing}")
            if key == "annotations" and len(item["bbox"]) != 4:
                raise ValueError(
                    f"annotation file {ann_file}: annotations[{i}]['bbox'] must be "
                    f"[x, y, w, h], got {item['bbox']}"
                )
