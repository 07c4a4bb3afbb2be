"""The demo's issue-9 hooks: masks in batches, mask head and MoE outputs, o2m AP with NMS."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from toy import data as toy_data  # noqa: E402
from toy.method_eval import mask_stats, paper_columns, predict_route  # noqa: E402
from toy.model import ToyDETRConfig, build_model  # noqa: E402

from mrdetr.boxes import box_cxcywh_to_xyxy, box_iou  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return toy_data.make_dataset(6, 64, 3, max_objects=3, min_frac=0.2)


def tiny(routes, masks=False, num_classes=4):
    torch.manual_seed(0)
    cfg = ToyDETRConfig(num_classes=num_classes, routes=routes, dim=32, ffn_dim=64,
                        num_queries=20, num_heads=4, backbone_width=16, num_instruction_tokens=2,
                        two_stage=True, masks=masks)  # fmt: skip
    return build_model(cfg)


def test_batch_masks_follow_flips(data):
    _, targets = toy_data.batch(data, [0, 1], flips=[True, False])
    for t, i, flipped in zip(targets, [0, 1], [True, False], strict=True):
        m = t["masks"]
        assert m.dtype == torch.bool and m.shape == (len(t["labels"]), 64, 64)
        expect = torch.from_numpy(data.masks[i].copy())
        assert torch.equal(m, expect.flip(-1) if flipped else expect)
        # the mask's tight box is the (flipped) target box
        ys, xs = m[0].nonzero(as_tuple=True)
        cx = (xs.min() + xs.max() + 1) / 2 / 64
        assert cx.item() == pytest.approx(t["boxes"][0, 0].item(), abs=1e-5)


def test_masks_and_moe_outputs_for_every_route(data):
    model = tiny("mr_detr_moe", masks=True, num_classes=data.num_classes).train()
    images, _ = toy_data.batch(data, [0, 1])
    out = model(images)
    assert set(out) == {"primary", "aux_ffn", "aux_instruct"}
    for route in out.values():
        assert route["pred_masks"].shape[:2] == (2, 20)
    assert set(k for k, v in out.items() if "loss_moe" in v) == {"aux_instruct"}


def test_o2m_route_predictions_survive_nms(data):
    model = tiny("mr_detr", num_classes=data.num_classes)
    images, _ = toy_data.batch(data, [0, 1, 2])
    for scores, labels, boxes, _ in predict_route(model, images, "aux_ffn", nms_iou=0.5):
        assert len(scores) > 0 and (scores[:-1] >= scores[1:]).all()
        iou = box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(boxes))[0]
        same = labels[:, None] == labels[None, :]
        off_diag = ~torch.eye(len(labels), dtype=torch.bool)
        assert not (iou[same & off_diag] > 0.5).any()
    assert model.training and model.decoder.eval_route_names == ("primary",)  # restored
    model.decoder.set_eval_routes(["aux_ffn"])  # a caller's own choice survives the call
    predict_route(model, images, "aux_instruct")
    assert model.decoder.eval_route_names == ("primary", "aux_ffn")


@pytest.mark.slow
def test_paper_columns_and_mask_stats_run_on_the_val_set(data):
    model = tiny("mr_detr", masks=True, num_classes=data.num_classes)
    cols = paper_columns(model, data, nms_iou=0.7)
    assert cols["o2m_route"] == "aux_ffn"
    assert cols["gap"] == pytest.approx(cols["o2m_nms_AP"] - cols["o2o_AP"])
    stats = mask_stats(model, data)
    assert 0.0 <= stats["mask_AP"] <= 1.0 and 0.0 <= stats["box_AP"] <= 1.0
    assert paper_columns(tiny("baseline", num_classes=data.num_classes), data) is None
