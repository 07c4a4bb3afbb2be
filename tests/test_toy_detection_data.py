"""Toy demo data: synthetic shapes are valid COCO with masks matching boxes; bad input errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from toy import coco as toy_coco
from toy import data as toy_data  # noqa: E402
from toy.evaluate import coco_stats  # noqa: E402


@pytest.fixture(scope="module")
def shapes():
    return toy_data.make_dataset(12, 48, seed=3)


def test_same_seed_same_data_other_seed_other_data(shapes):
    again = toy_data.make_dataset(12, 48, seed=3)
    other = toy_data.make_dataset(12, 48, seed=4)
    assert np.array_equal(shapes.images, again.images)
    assert shapes.coco == again.coco
    assert not np.array_equal(shapes.images, other.images)


def test_coco_dict_loads_in_pycocotools_and_masks_match_boxes(shapes):
    gt = COCO()
    gt.dataset = shapes.coco
    gt.createIndex()
    assert sorted(gt.getImgIds()) == shapes.image_ids
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(toy_data.CLASSES)
    for k, image_id in enumerate(shapes.image_ids):
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(shapes.labels[k]) == len(shapes.masks[k]) >= 1
        for j, ann in enumerate(anns):
            m = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(m, shapes.masks[k][j])  # RLE is the kept mask
            ys, xs = np.nonzero(m)  # independent tight box of the mask, in pixels
            box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert ann["bbox"] == pytest.approx(box)
            assert ann["area"] == m.sum()
            assert ann["category_id"] - 1 == shapes.labels[k][j]
            cx, cy, w, h = shapes.boxes[k][j] * 48
            assert [cx - w / 2, cy - h / 2, w, h] == pytest.approx(box, abs=1e-4)


def test_perfect_detections_score_ap_one_and_write_load_round_trip(shapes, tmp_path):
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in shapes.coco["annotations"]
    ]
    assert coco_stats(shapes.coco, results)["AP"] == pytest.approx(1.0)
    ann, folder = toy_data.write_coco(shapes, tmp_path, "val")
    loaded = toy_coco.load_coco(ann, folder, 48)
    assert np.array_equal(loaded.images, shapes.images)
    for a, b in zip(loaded.boxes, shapes.boxes, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    resized = toy_coco.load_coco(ann, folder, 32)  # boxes stay normalised to the original size
    assert resized.images.shape == (12, 32, 32, 3)
    for a, b in zip(resized.boxes, shapes.boxes, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _write(tmp_path, payload) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_bad_annotation_files_and_folders_name_the_file(shapes, tmp_path):
    ann, folder = toy_data.write_coco(shapes, tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        toy_coco.load_coco(tmp_path / "nope.json", folder, 32)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        toy_coco.load_coco(ann, tmp_path / "missing_dir", 32)
    bad = _write(tmp_path, "{not json")
    with pytest.raises(ValueError, match=r"ann\.json is not valid json"):
        toy_coco.load_coco(bad, folder, 32)
    bad = _write(tmp_path, {"images": [], "annotations": []})
    with pytest.raises(ValueError, match=r"ann\.json.*'categories'"):
        toy_coco.load_coco(bad, folder, 32)
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(ValueError, match=r"ann\.json.*annotations\[0\]\['bbox'\]"):
        toy_coco.load_coco(_write(tmp_path, coco), folder, 32)
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["category_id"] = 99
    with pytest.raises(ValueError, match=r"ann\.json.*category_id 99"):
        toy_coco.load_coco(_write(tmp_path, coco), folder, 32)
    (folder / shapes.coco["images"][0]["file_name"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"000000\.png"):
        toy_coco.load_coco(ann, folder, 32)


def test_make_dataset_rejects_bad_sizes():
    with pytest.raises(ValueError, match="image_size"):
        toy_data.make_dataset(2, 0)
