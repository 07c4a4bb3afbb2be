"""Route-aware matchers: Hungarian one-to-one, one-to-many, H-DETR repeated-gt, and a router.

Every matcher is called as ``matcher(outputs, targets)`` with ``outputs = {"pred_logits":
Tensor[B, Q, K], "pred_boxes": Tensor[B, Q, 4]}`` and ``targets`` a list of ``B`` dicts
``{"labels": Tensor[N_b] int64, "boxes": Tensor[N_b, 4]}`` (cxcywh), runs under ``no_grad`` and
returns one ``(pred_idx, gt_idx)`` pair of int64 tensors per image on the predictions' device.
"""

from .base import Matcher
from .hungarian import HungarianMatcher
from .indices import MatchIndices
from .one_to_many import OneToManyMatcher
from .repeated_gt import RepeatedGTMatcher
from .router import RouteMatcher

__all__ = [
    "HungarianMatcher",
    "MatchIndices",
    "Matcher",
    "OneToManyMatcher",
    "RepeatedGTMatcher",
    "RouteMatcher",
]
