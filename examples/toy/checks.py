"""A user's train and val COCO files read and checked together, before any training.

``load_pair(train_ann, train_images, val_ann, val_images, image_size)`` reads both (every image
opened once, ``toy.coco.load_coco``), maps val's categories onto train's (by name where both name
them, else by id: val may list them in another order, a subset of them, or extra ones that no
annotation uses) and checks that both splits have annotations to train on and to evaluate, so a
bad file fails in seconds with an error naming it, not at the first evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .coco import load_coco
from .data import DetectionData

__all__ = ["align_categories", "check_usable", "load_pair"]


def _key(cat: dict, named: bool):
    return cat.get("name") if named else cat["id"]


def _describe(cat: dict) -> str:
    return f"id {cat['id']} {cat['name']!r}" if "name" in cat else f"id {cat['id']}"


def align_categories(train: DetectionData, val: DetectionData, val_file) -> DetectionData:
    """``val`` relabelled into ``train``'s categories: its COCO dict uses train's category ids
    and its labels train's contiguous labels, so a prediction's label means the same category
    in both.

    Raises:
        ValueError: a val category that annotations use has no counterpart in train (naming it),
            or a category id means different names in the two files.
    """
    t_cats, v_cats = train.coco["categories"], val.coco["categories"]
    named = all("name" in c for c in t_cats + v_cats)
    train_id = {_key(c, named): c["id"] for c in t_cats}
    used = {a["category_id"] for a in val.coco["annotations"]}
    val_to_train, missing = {}, []
    for c in v_cats:
        if _key(c, named) in train_id:
            val_to_train[c["id"]] = train_id[_key(c, named)]
        elif c["id"] in used:
            missing.append(_describe(c))
    if missing:
        known = [_describe(c) for c in t_cats]
        raise ValueError(
            f"{val_file}: val annotations use categories that train does not have: "
            f"{', '.join(missing)} (train's categories: {', '.join(known)}); the model can only "
            "predict train's categories"
        )
    coco = dict(val.coco)
    coco["categories"] = [dict(c) for c in t_cats]
    coco["annotations"] = [
        {**a, "category_id": val_to_train[a["category_id"]]} for a in val.coco["annotations"]
    ]
    label_of = {cid: i for i, cid in enumerate(train.category_ids)}
    old_ids = val.category_ids  # val label -> val category id
    labels = [
        np.array([label_of[val_to_train[old_ids[k]]] for k in lab], np.int64) for lab in val.labels
    ]
    return DetectionData(val.images, val.boxes, labels, coco, val.image_ids, train.category_ids)


def check_usable(data: DetectionData, ann_file, role: str) -> None:
    """Raise ``ValueError`` naming ``ann_file`` when ``data`` has no box to train on (``role``
    "train") or to evaluate against ("val": COCO AP is undefined without a non-crowd box)."""
    anns = data.coco["annotations"]
    usable = sum(len(b) for b in data.boxes)
    if usable == 0:
        crowd = sum(1 for a in anns if a.get("iscrowd", 0))
        what = "no annotations" if not anns else f"{len(anns)} annotations, {crowd} of them crowd"
        why = "COCO AP is undefined" if role == "val" else "nothing to learn"
        raise ValueError(
            f"{ann_file}: the {role} set has no usable annotation ({what}; crowd boxes and boxes "
            f"without area do not count): {why}"
        )


def load_pair(
    train_ann, train_images, val_ann, val_images, image_size: int
) -> tuple[DetectionData, DetectionData]:
    """Train and val :class:`DetectionData`, checked together (see the module docstring)."""
    train = load_coco(train_ann, train_images, image_size)
    val = load_coco(val_ann, val_images, image_size)
    check_usable(train, Path(train_ann), "train")
    val = align_categories(train, val, Path(val_ann))
    check_usable(val, Path(val_ann), "val")
    return train, val
