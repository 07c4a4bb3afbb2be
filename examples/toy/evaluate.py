"""COCO evaluation of the toy detector's primary route with pycocotools.

``predict(model, images)`` -> per image (scores, labels, boxes); ``evaluate(model, data)`` ->
``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}``. Under ``torch.distributed`` every
process predicts its share of the images and rank 0 evaluates the gathered detections.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
import torch.distributed as dist

from .data import DetectionData, batch

__all__ = ["STAT_NAMES", "coco_stats", "evaluate", "predict", "to_coco_results"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


@torch.no_grad()
def predict(model, images: torch.Tensor, top_k: int = 100) -> list[tuple]:
    """Primary-route detections of ``images (Tensor[B, 3, H, W])``.

    Returns per image ``(scores [k], labels [k] int64, boxes [k, 4] normalised cxcywh)``: the
    ``top_k`` highest query-class sigmoid scores over all ``Q x K`` pairs.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(images)["primary"]
    finally:
        model.train(was_training)
    prob = out["pred_logits"].sigmoid().flatten(1)  # [B, Q*K]
    k = min(top_k, prob.shape[1])
    scores, idx = prob.topk(k, dim=1)
    num_classes = out["pred_logits"].shape[-1]
    query, labels = idx // num_classes, idx % num_classes
    boxes = out["pred_boxes"].gather(1, query[..., None].expand(-1, -1, 4))
    return [(scores[i], labels[i], boxes[i]) for i in range(len(scores))]


def to_coco_results(preds: list[tuple], data: DetectionData, indices) -> list[dict]:
    """COCO detection results (``bbox`` in the original image's pixels) for ``indices``."""
    infos = {img["id"]: img for img in data.coco["images"]}
    results = []
    for (scores, labels, boxes), i in zip(preds, indices, strict=True):
        image_id = data.image_ids[i]
        w, h = infos[image_id]["width"], infos[image_id]["height"]
        b = boxes.double().cpu().numpy() * np.array([w, h, w, h])
        xywh = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, 2:]], 1)
        for s, lab, box in zip(scores.tolist(), labels.tolist(), xywh.tolist(), strict=True):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": data.category_ids[lab],
                    "bbox": [round(v, 3) for v in box],
                    "score": s,
                }
            )
    return results


def coco_stats(coco_gt: dict, results: list[dict], image_ids=None) -> dict[str, float]:
    """pycocotools bbox evaluation of ``results`` against the COCO dict ``coco_gt``: ``{name:
    float}`` for :data:`STAT_NAMES`, None where no gt box falls in the area range (e.g. APl on
    small images)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(STAT_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_gt)
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # pycocotools reports -1 where no gt box falls in an area range: None (not 0) here
    return {n: (float(v) if v >= 0 else None) for n, v in zip(STAT_NAMES, ev.stats, strict=False)}


def evaluate(model, data: DetectionData, batch_size: int = 32) -> dict[str, float]:
    """COCO bbox stats of ``model``'s primary route on every image of ``data``.

    Distributed: each process predicts images ``rank::world``; rank 0 evaluates all of them and
    every process returns its stats.
    """
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(data), world))
    results = []
    device = next(model.parameters()).device
    for s in range(0, len(mine), batch_size):
        idx = mine[s : s + batch_size]
        images, _ = batch(data, idx)
        results += to_coco_results(predict(model, images.to(device)), data, idx)
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        stats = [None]
        if rank == 0:
            stats = [coco_stats(data.coco, [r for part in gathered for r in part])]
        dist.broadcast_object_list(stats, src=0)
        return stats[0]
    return coco_stats(data.coco, results)
