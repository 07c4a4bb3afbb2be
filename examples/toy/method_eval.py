"""The demo's evaluation of issue 9's parts: auxiliary-route AP with NMS, and mask AP.

- ``predict_route(model, images, route)``: detections of any route (``set_eval_routes``), with
  batched class-aware NMS for a one-to-many route (``mrdetr.nms.nms_mask``);
- ``route_stats(model, data, route)``: its COCO box AP;
- ``mask_stats(model, data)``: the primary route's mask AP and box AP (pycocotools ``segm`` /
  ``bbox``) from the mask head's logits, RLE-encoded by ``mrdetr.segmentation``;
- ``paper_columns(model, data)``: the paper's three columns, primary o2o AP, the first
  one-to-many route's AP with NMS, and the gap.
"""

from __future__ import annotations

import contextlib
import copy
import io

import torch

from mrdetr.boxes import box_cxcywh_to_xyxy
from mrdetr.nms import nms_mask
from mrdetr.segmentation import evaluate_coco, masks_to_coco_results

from .data import DetectionData, batch
from .evaluate import STAT_NAMES, coco_stats, to_coco_results

__all__ = ["mask_stats", "paper_columns", "predict_route", "route_stats"]


@torch.no_grad()
def predict_route(
    model,
    images,
    route: str = "primary",
    top_k: int = 100,
    nms_iou: float | None = None,
    pre_nms: int = 300,
    with_masks: bool = False,
):
    """Detections of ``route`` for ``images (Tensor[B, 3, H, W])``.

    The ``pre_nms`` (or ``top_k`` without NMS) highest query-class sigmoid scores over ``Q x K``;
    with ``nms_iou`` class-aware NMS on them, then the ``top_k`` best survivors. Returns per image
    ``(scores [k], labels [k], boxes [k, 4] cxcywh, mask_logits [k, h, w] or None)``.
    """
    was_training, eval_routes = model.training, model.decoder.eval_route_names[1:]
    model.eval()
    try:
        if route != "primary" and route not in eval_routes:
            model.decoder.set_eval_routes([*eval_routes, route])
        out = model(images)[route]
    finally:
        model.decoder.set_eval_routes(eval_routes)  # the caller's choice, restored
        model.train(was_training)
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    b, q, k = logits.shape
    prob = logits.sigmoid().flatten(1)  # [B, Q*K]
    n = min(pre_nms if nms_iou is not None else top_k, prob.shape[1])
    scores, idx = prob.topk(n, dim=1)  # [B, n]
    query, labels = idx // k, idx % k
    cand = boxes.gather(1, query[..., None].expand(-1, -1, 4))  # [B, n, 4]
    if nms_iou is not None:
        keep = nms_mask(box_cxcywh_to_xyxy(cand), scores, nms_iou, labels)  # [B, n]
        scores = scores.masked_fill(~keep, -1.0)
        scores, order = scores.topk(min(top_k, n), dim=1)
        query, labels = query.gather(1, order), labels.gather(1, order)
        cand = cand.gather(1, order[..., None].expand(-1, -1, 4))
    masks = out.get("pred_masks") if with_masks else None
    result = []
    for i in range(b):
        ok = scores[i] >= 0  # drops NMS-suppressed padding
        m = None if masks is None else masks[i, query[i][ok]]
        result.append((scores[i][ok], labels[i][ok], cand[i][ok], m))
    return result


def route_stats(
    model, data: DetectionData, route: str, nms_iou: float | None = None, batch_size: int = 32
) -> dict[str, float]:
    """COCO box stats of ``route`` (NMS with ``nms_iou``) on every image of ``data``."""
    results = []
    device = next(model.parameters()).device
    for s in range(0, len(data), batch_size):
        idx = list(range(s, min(s + batch_size, len(data))))
        images, _ = batch(data, idx)
        preds = predict_route(model, images.to(device), route, nms_iou=nms_iou)
        results += to_coco_results([p[:3] for p in preds], data, idx)
    return coco_stats(data.coco, results)


def mask_stats(model, data: DetectionData, batch_size: int = 32) -> dict[str, float]:
    """Primary-route mask AP (``segm``) beside box AP (``bbox``) on every image of ``data``."""
    from pycocotools.coco import COCO

    device = next(model.parameters()).device
    infos = {img["id"]: img for img in data.coco["images"]}
    segm, boxes = [], []
    for s in range(0, len(data), batch_size):
        idx = list(range(s, min(s + batch_size, len(data))))
        images, _ = batch(data, idx)
        preds = predict_route(model, images.to(device), with_masks=True)
        boxes += to_coco_results([p[:3] for p in preds], data, idx)
        for (scores, labels, _, masks), i in zip(preds, idx, strict=True):
            info = infos[data.image_ids[i]]
            segm += masks_to_coco_results(
                masks[None], scores[None], labels[None], [data.image_ids[i]],
                [(info["height"], info["width"])], category_ids=data.category_ids,
            )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(data.coco)
        gt.createIndex()
    stats = evaluate_coco(gt, segm, "segm")
    out = {f"mask_{n}": max(float(v), 0.0) for n, v in zip(STAT_NAMES, stats, strict=False)}
    return {**out, **{f"box_{n}": v for n, v in coco_stats(data.coco, boxes).items()}}


def paper_columns(model, data: DetectionData, nms_iou: float = 0.7) -> dict[str, float] | None:
    """The paper's columns for ``model``: ``{"o2o_AP", "o2m_route", "o2m_nms_AP", "gap"}`` with
    the first one-to-many auxiliary route; None for a route set without one."""
    o2m = [r.name for r in model.route_set[1:] if r.supervision == "o2m"]
    if not o2m:
        return None
    o2o = route_stats(model, data, "primary")["AP"]
    aux = route_stats(model, data, o2m[0], nms_iou=nms_iou)["AP"]
    return {"o2o_AP": o2o, "o2m_route": o2m[0], "o2m_nms_AP": aux, "gap": aux - o2o,
            "nms_iou": nms_iou}  # fmt: skip


def method_report(runs: dict) -> str:
    """Markdown tables of the paper's columns and of mask AP for the runs that have them."""
    lines = []
    paper = {k: v["paper"] for k, v in runs.items() if v.get("paper")}
    if paper:
        lines += ["", "## Primary route vs one-to-many route (paper's ablation columns)", "",
                  "| routes | AP (o2o, primary) | o2m route | AP (o2m w/ NMS) | gap (o2m - o2o) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, p in paper.items():
            lines.append(f"| {name} | {p['o2o_AP']:.3f} | {p['o2m_route']} | "
                         f"{p['o2m_nms_AP']:.3f} | {p['gap']:+.3f} |")  # fmt: skip
        iou = next(iter(paper.values()))["nms_iou"]
        lines += ["", f"NMS: class-aware, IoU > {iou} suppressed (`mrdetr.nms`), top 100 after. "
                  "AP on COCO's 0-1 scale, as above."]  # fmt: skip
    masks = {k: v["masks"] for k, v in runs.items() if v.get("masks")}
    if masks:
        lines += ["", "## Instance segmentation (primary route, mask head shared by all routes)",
                  "", "| routes | mask AP | mask AP50 | box AP | box AP50 |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, m in masks.items():
            lines.append(f"| {name} | {m['mask_AP']:.3f} | {m['mask_AP50']:.3f} | "
                         f"{m['box_AP']:.3f} | {m['box_AP50']:.3f} |")  # fmt: skip
    return "\n".join(lines) + ("\n" if lines else "")
