"""Instance segmentation for (multi-route) DETRs: a mask head shared by every route, point-sampled
mask losses, a mask-aware Hungarian matcher, and post-processing to COCO RLE results / mask AP.
See ``docs/segmentation.md``."""

from .head import MaskHead, attention_maps
from .losses import (
    MaskLoss,
    dice_loss,
    grid_points,
    mask_losses,
    pairwise_mask_costs,
    point_sample,
    sample_points,
    sigmoid_bce_loss,
)
from .matcher import MaskHungarianMatcher
from .postprocess import encode_rle, evaluate_coco, masks_to_coco_results, resize_mask_logits

__all__ = [
    "MaskHead",
    "MaskHungarianMatcher",
    "MaskLoss",
    "attention_maps",
    "dice_loss",
    "encode_rle",
    "evaluate_coco",
    "grid_points",
    "mask_losses",
    "masks_to_coco_results",
    "pairwise_mask_costs",
    "point_sample",
    "resize_mask_logits",
    "sample_points",
    "sigmoid_bce_loss",
]
