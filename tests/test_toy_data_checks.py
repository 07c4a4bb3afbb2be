"""A user's COCO train + val read and checked together: categories mapped by name, unusable val
refused before training, 16-bit PNG scaled, odd boxes warned about, malformed entries named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
PIL = pytest.importorskip("PIL")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import toy_detection  # noqa: E402
from PIL import Image  # noqa: E402
from toy import data as toy_data  # noqa: E402
from toy.checks import load_pair  # noqa: E402
from toy.coco import load_coco  # noqa: E402
from toy.evaluate import coco_stats, to_coco_results  # noqa: E402


@pytest.fixture
def pair(tmp_path):
    """Train (8 images) and val (4 images) synthetic shapes written as COCO files."""
    train = toy_data.make_dataset(8, 32, seed=0, max_objects=3, min_frac=0.2)
    val = toy_data.make_dataset(4, 32, seed=1, max_objects=3, min_frac=0.2)
    t_ann, t_dir = toy_data.write_coco(train, tmp_path, "train")
    v_ann, v_dir = toy_data.write_coco(val, tmp_path, "val")
    return val, t_ann, t_dir, v_ann, v_dir


def _edit(path: Path, fn) -> Path:
    coco = json.loads(path.read_text())
    fn(coco)
    path.write_text(json.dumps(coco))
    return path


def _perfect_ap(val) -> float:
    preds = [
        (torch.ones(len(lab)), torch.from_numpy(lab), torch.from_numpy(box))
        for lab, box in zip(val.labels, val.boxes, strict=True)
    ]
    return coco_stats(val.coco, to_coco_results(preds, val, range(len(val))))["AP"]


def test_val_categories_in_another_order_with_other_ids_and_an_extra_one_map_by_name(pair):
    shapes, t_ann, t_dir, v_ann, v_dir = pair

    def reorder(coco):  # an unused extra category first, train's in reverse order, ids + 10
        cats = [{"id": c["id"] + 10, "name": c["name"]} for c in reversed(coco["categories"])]
        coco["categories"] = [{"id": 99, "name": "zebra"}, *cats]
        for a in coco["annotations"]:
            a["category_id"] += 10

    _edit(v_ann, reorder)
    _, val = load_pair(t_ann, t_dir, v_ann, v_dir, 32)
    for got, want in zip(val.labels, shapes.labels, strict=True):  # train's label space
        assert got.tolist() == want.tolist()
    assert _perfect_ap(val) == pytest.approx(1.0)


def test_val_with_a_subset_of_train_categories_maps_and_scores_perfect_predictions(pair):
    shapes, t_ann, t_dir, v_ann, v_dir = pair

    def subset(coco):
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in (2, 3)]
        coco["categories"] = [c for c in coco["categories"] if c["id"] in (2, 3)]

    _edit(v_ann, subset)
    _, val = load_pair(t_ann, t_dir, v_ann, v_dir, 32)
    want = [lab[(lab == 1) | (lab == 2)].tolist() for lab in shapes.labels]
    assert [lab.tolist() for lab in val.labels] == want
    assert _perfect_ap(val) == pytest.approx(1.0)


def test_val_category_unknown_to_train_is_named(pair):
    _, t_ann, t_dir, v_ann, v_dir = pair

    def extra(coco):
        coco["categories"].append({"id": 7, "name": "zebra"})
        coco["annotations"][0]["category_id"] = 7

    _edit(v_ann, extra)
    with pytest.raises(ValueError, match=r"val\.json.*id 7 'zebra'.*train's categories"):
        load_pair(t_ann, t_dir, v_ann, v_dir, 32)


@pytest.mark.parametrize("kind", ["empty", "crowd"])
def test_val_without_usable_annotations_fails_before_training(pair, tmp_path, kind):
    _, t_ann, t_dir, v_ann, v_dir = pair

    def spoil(coco):
        if kind == "empty":
            coco["annotations"] = []
        for a in coco["annotations"]:
            a["iscrowd"] = 1

    _edit(v_ann, spoil)
    out = tmp_path / "out"
    argv = ["--quick", "--no-progress", "--out", str(out), "--image-size", "32",
            "--train-ann", str(t_ann), "--train-images", str(t_dir),
            "--val-ann", str(v_ann), "--val-images", str(v_dir)]  # fmt: skip
    with pytest.raises(ValueError, match=r"val\.json: the val set has no usable annotation"):
        toy_detection.main(argv)
    assert not (out / "baseline").exists()  # no training time spent


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    grey = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    (tmp_path / "img").mkdir()
    Image.fromarray(grey).save(tmp_path / "img" / "a.png")
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8]}
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}],
            "annotations": [ann]}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(coco))
    data = load_coco(tmp_path / "a.json", tmp_path / "img", 32)
    want = np.rint(grey / 65535.0 * 255.0)
    assert np.abs(data.images[0, :, :, 0].astype(float) - want).max() <= 1
    assert (data.images[0] == 255).mean() < 0.01  # PIL's RGB conversion made 99.6 % white


def test_boxes_outside_the_image_or_with_negative_size_are_named_in_a_warning(pair):
    shapes, t_ann, t_dir, v_ann, v_dir = pair
    first = {}

    def odd(coco):
        anns = [a for a in coco["annotations"] if a["image_id"] == 1]
        first.update(id=anns[0]["id"])
        anns[0]["bbox"] = [20.0, 24.0, 20.0, 16.0]  # to x 40, y 40 in a 32 x 32 image
        coco["annotations"].append({"id": 500, "image_id": 2, "category_id": 1,
                                    "bbox": [5.0, 5.0, -3.0, 4.0]})  # fmt: skip

    _edit(t_ann, odd)
    with pytest.warns(UserWarning) as rec:
        train, _ = load_pair(t_ann, t_dir, v_ann, v_dir, 32)
    text = "\n".join(str(w.message) for w in rec)
    assert f"annotation id {first['id']} of image 000000.png" in text and "clipped" in text
    assert "annotation id 500 of image 000001.png" in text and "width or height <= 0" in text
    box = train.boxes[0][0]  # clipped to x 20..32, y 24..32: cxcywh / 32
    np.testing.assert_allclose(box, np.array([26, 28, 12, 8]) / 32, atol=1e-6)
    assert len(train.labels[1]) == len([a for a in json.loads(t_ann.read_text())["annotations"]
                                        if a["image_id"] == 2]) - 1  # fmt: skip


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_undecodable_image_names_the_file(pair, how):
    _, t_ann, t_dir, v_ann, v_dir = pair
    path = v_dir / "000002.png"
    if how == "garbage":
        path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    else:
        img = Image.open(path).convert("RGB")
        img.save(path.with_suffix(".jpg"), quality=95)
        raw = path.with_suffix(".jpg").read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"000002\.png \(image id 3 in .*val\.json\) cannot be"):
        load_pair(t_ann, t_dir, v_ann, v_dir, 32)


@pytest.mark.parametrize("bbox", [["1", "2", "3", "4"], None, [1, 2, float("nan"), 4], True])
def test_malformed_bbox_names_the_annotation(pair, bbox):
    _, t_ann, t_dir, v_ann, v_dir = pair
    _edit(t_ann, lambda coco: coco["annotations"][2].update(bbox=bbox, id=77))
    with pytest.raises(ValueError, match=r"train\.json: annotations\[2\].*annotation id 77"):
        load_pair(t_ann, t_dir, v_ann, v_dir, 32)


def test_unknown_image_or_category_id_says_which(pair):
    _, t_ann, t_dir, v_ann, v_dir = pair
    coco = json.loads(t_ann.read_text())
    _edit(t_ann, lambda c: c["annotations"][0].update(image_id=1000))
    with pytest.raises(ValueError, match=r"refers to image_id 1000, which is not in 'images'"):
        load_pair(t_ann, t_dir, v_ann, v_dir, 32)
    coco["annotations"][0]["category_id"] = 99
    t_ann.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"category_id 99, which is not in 'categories'"):
        load_pair(t_ann, t_dir, v_ann, v_dir, 32)


def test_train_and_val_images_are_opened_once(pair, monkeypatch):
    _, t_ann, t_dir, v_ann, v_dir = pair
    opened = []
    real = Image.open
    monkeypatch.setattr(
        Image, "open", lambda p, *a, **k: opened.append(Path(p).name) or real(p, *a, **k)
    )
    load_pair(t_ann, t_dir, v_ann, v_dir, 32)
    assert len(opened) == 8 + 4
