"""RLE encoding and mask AP through pycocotools (skipped without it)."""

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from mrdetr.segmentation import encode_rle, evaluate_coco, masks_to_coco_results  # noqa: E402


def coco_from(masks_per_image):
    """A COCO ground truth built from exact bool masks ``[N, H, W]`` per image."""
    images, anns = [], []
    for i, masks in enumerate(masks_per_image):
        h, w = masks.shape[-2:]
        images.append({"id": i, "height": h, "width": w})
        for m, rle in zip(masks, encode_rle(masks), strict=True):
            ys, xs = m.nonzero(as_tuple=True)
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 0, "iscrowd": 0,
                         "segmentation": rle, "area": float(m.sum()), "bbox": bbox})  # fmt: skip
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 0}]}
    coco.createIndex()
    return coco


def square_masks(h=32, w=32):
    m = torch.zeros(2, h, w, dtype=torch.bool)
    m[0, 2:12, 3:15] = True
    m[1, 18:30, 16:28] = True
    return m


def test_rle_roundtrip():
    m = torch.rand(3, 17, 23) > 0.5
    decoded = mask_utils.decode(encode_rle(m))  # [H, W, M]
    assert np.array_equal(decoded.transpose(2, 0, 1), m.numpy().astype(np.uint8))


def test_perfect_masks_give_ap_1_and_wrong_ones_ap_0():
    gt = square_masks()
    coco = coco_from([gt])
    # logits at half resolution, upsampled by masks_to_coco_results to the image size
    small = torch.nn.functional.avg_pool2d(gt[None].float(), 2)[0]
    logits = (small * 2 - 1) * 20  # [2, 16, 16]
    res = masks_to_coco_results(
        logits[None], torch.tensor([[0.9, 0.8]]), torch.zeros(1, 2, dtype=torch.long), [0],
        [(32, 32)],
    )  # fmt: skip
    assert len(res) == 2 and res[0]["segmentation"]["size"] == [32, 32]
    assert evaluate_coco(coco, res, "segm")[0] == pytest.approx(1.0)
    wrong = masks_to_coco_results(
        logits.flip(0)[None] * 0 - 20, torch.tensor([[0.9, 0.8]]),
        torch.zeros(1, 2, dtype=torch.long), [0], [(32, 32)],
    )  # fmt: skip
    assert evaluate_coco(coco, wrong, "segm")[0] == pytest.approx(0.0)
    assert evaluate_coco(coco, [], "segm")[0] == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="mask_logits"):
        masks_to_coco_results(torch.zeros(2, 4, 4), torch.zeros(2, 4), torch.zeros(2, 4), [0], [])
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_coco(None, [], "keypoints")
