"""A user's COCO instances json + image folder as :class:`~toy.data.DetectionData`, with clear
errors naming the file, image, annotation or category for whatever is missing or malformed, and
one warning naming the images and annotations of boxes that are not trained on as written.

Train and val are read and checked together by ``toy.checks.load_pair`` (categories aligned,
usable annotations); ``load_coco`` reads one file and opens every image once.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from .data import DetectionData, xywh_to_cxcywh

__all__ = ["image_rgb", "load_coco"]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def image_rgb(im) -> np.ndarray:
    """A PIL image as ``uint8 [H, W, 3]``; 16-bit greyscale is scaled by 255/65535 (PIL's own
    conversion clips it at 255, turning most of the image white)."""
    if im.mode in _SIXTEEN_BIT or (im.mode == "I" and np.asarray(im).max() > 255):
        grey = np.asarray(im).astype(np.float64) * (255.0 / 65535.0)
        return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _read_image(path: Path, size: int, image_id, ann_file: Path) -> tuple[np.ndarray, int, int]:
    """``(uint8 [size, size, 3], width, height)`` of the image at ``path``, decoded once."""
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"image {path} listed in {ann_file} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = image_rgb(im)
    except (OSError, SyntaxError, ValueError) as e:  # PIL: corrupt, truncated, unknown format
        raise ValueError(
            f"image {path} (image id {image_id} in {ann_file}) cannot be decoded: {e}"
        ) from None
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((size, size))), w, h


def _box_problem(bbox, w: float, h: float) -> str | None:
    """Why ``bbox`` (pixel xywh) is not trained on as written, or None."""
    x, y, bw, bh = bbox
    if bw <= 0 or bh <= 0:
        return f"bbox {bbox} has width or height <= 0: not trained on"
    if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
        return f"bbox {bbox} lies outside the {w}x{h} image: not trained on"
    if x < -0.5 or y < -0.5 or x + bw > w + 0.5 or y + bh > h + 0.5:
        return f"bbox {bbox} extends outside the {w}x{h} image: clipped to it"
    return None


def _warn(problems: list[str], ann_file: Path) -> None:
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        warnings.warn(f"{ann_file}: {len(problems)} boxes:\n  {shown}{more}", stacklevel=3)


def load_coco(ann_file: str | Path, image_dir: str | Path, image_size: int) -> DetectionData:
    """Read a COCO instances json and its image folder, resizing images to ``image_size``.

    Boxes stay normalised to the original size, so predictions map back exactly; crowd
    annotations are not trained on (kept for evaluation); a box with width or height <= 0 or
    wholly outside its image is not trained on and one extending outside is clipped, with one
    warning naming each such annotation and its image.

    Raises:
        FileNotFoundError: the annotation file or image folder (or an image) is missing.
        ValueError: the annotation file is not valid json, misses COCO keys, has a malformed
            bbox or an unknown image or category id, or an image cannot be decoded, naming the
            file and the entry.
    """
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
        if a["image_id"] not in per_image:
            raise ValueError(
                f"annotation file {ann_file}: annotation id {a.get('id')} refers to image_id "
                f"{a['image_id']}, which is not in 'images'"
            )
        if a["category_id"] not in label_of:
            raise ValueError(
                f"annotation file {ann_file}: annotation id {a.get('id')} refers to "
                f"category_id {a['category_id']}, which is not in 'categories' {cat_ids}"
            )
        per_image[a["image_id"]].append(a)
    images, boxes, labels, problems = [], [], [], []
    for info in coco["images"]:
        path = image_dir / info["file_name"]
        img, w, h = _read_image(path, image_size, info["id"], ann_file)
        images.append(img)
        w, h = info.setdefault("width", w), info.setdefault("height", h)
        kept = []
        for a in per_image[info["id"]]:
            why = None if a.get("iscrowd", 0) else _box_problem(a["bbox"], w, h)
            if why:
                problems.append(f"annotation id {a.get('id')} of image {path.name}: {why}")
            if not a.get("iscrowd", 0) and (why is None or why.endswith("clipped to it")):
                kept.append(a)
        xyxy = np.array([a["bbox"] for a in kept], np.float64).reshape(-1, 4)
        xyxy[:, 2:] += xyxy[:, :2]
        xyxy = xyxy.clip(0, [w, h, w, h])
        boxes.append(
            xywh_to_cxcywh(np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1), w, h)
        )
        labels.append(np.array([label_of[a["category_id"]] for a in kept], np.int64))
    _warn(problems, ann_file)
    for a in coco["annotations"]:
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        a.setdefault("iscrowd", 0)
    return DetectionData(
        np.stack(images), boxes, labels, coco, [i["id"] for i in coco["images"]], cat_ids
    )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
            bbox = item.get("bbox") if key == "annotations" else None
            if key == "annotations" and not (
                isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))
            ):
                raise ValueError(
                    f"annotation file {ann_file}: annotations[{i}]['bbox'] (annotation id "
                    f"{item.get('id')}) must be [x, y, w, h] of 4 finite numbers, got {bbox!r}"
                )
