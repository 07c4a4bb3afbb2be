"""``HostMatcher``: mrdetr's one-to-many matcher behind the interface of transformers' matchers.

transformers' detection losses build a Hungarian matcher and call it as ``matcher(outputs,
targets)`` (LW-DETR / RF-DETR: ``matcher(outputs, targets, group_detr)``) with HF keys:
``outputs = {"logits": Tensor[B, Q, K'], "pred_boxes": Tensor[B, Q, 4]}`` and targets
``{"class_labels": Tensor[N_b], "boxes": Tensor[N_b, 4]}``; it returns one ``(pred_idx,
gt_idx)`` pair of int64 tensors per image. :class:`HostMatcher` answers the same call with a
one-to-many assignment (:class:`~mrdetr.matching.OneToManyMatcher` by default), so that an
auxiliary route is supervised by the family's own loss terms on one-to-many pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..matching import OneToManyMatcher

__all__ = ["CLASS_SCORES", "HostMatcher"]

CLASS_SCORES = ("sigmoid", "softmax", "softmax_no_object", "text_tokens")
"""How a family turns logits into class probabilities: ``"sigmoid"`` (focal / VFL / MAL families:
Deformable, Conditional, DAB, RT-DETR, D-FINE, DEIM, LW-DETR), ``"softmax"`` over the ``K``
classes (RT-DETR with ``use_focal_loss=False``) or ``"softmax_no_object"`` over ``K + 1`` columns
whose last is "no object" (DETR, Table Transformer); ``"text_tokens"``: sigmoid over text tokens,
a class's probability the mean over its phrase's tokens (``outputs["label_maps"]``, Grounding
DINO)."""

# probabilities are turned into logits for the matcher, clamped away from 0 and 1 so that they
# stay finite (the matcher refuses non-finite quality)
_EPS = 1e-6


def _phrase_logits(logits: Tensor, label_maps) -> Tensor:
    """Per phrase, the logit of the mean token probability: ``[B, Q, max K_b]`` (padding
    phrases: probability ``1e-6``)."""
    if label_maps is None:
        raise ValueError('HostMatcher: class_score "text_tokens" needs outputs["label_maps"]')
    prob = logits.float().sigmoid()  # -inf past the prompt -> 0
    k = max(m.shape[0] for m in label_maps)
    out = prob.new_full((*prob.shape[:2], k), _EPS)
    for b, m in enumerate(label_maps):
        m = m.float()
        out[b, :, : m.shape[0]] = prob[b] @ (m / m.sum(-1, keepdim=True).clamp(min=1)).t()
    return torch.logit(out, eps=_EPS)


class HostMatcher(nn.Module):
    """A matcher with the call of transformers' Hungarian matchers, backed by an mrdetr matcher.

    Args:
        class_score: one of :data:`CLASS_SCORES` (the family's classification).
        matcher: an mrdetr matcher taking ``{"pred_logits", "pred_boxes"}`` and ``{"labels",
            "boxes"}`` and reading class probabilities as ``sigmoid(pred_logits)`` (default
            ``OneToManyMatcher()``: k = 6, quality ``0.7 IoU + 0.3 p``, threshold 0.4).

    ``forward(outputs, targets, group_detr=1) -> list[(pred_idx Tensor[M_b], gt_idx
    Tensor[M_b])]``: ``outputs["logits"] (Tensor[B, Q, K'])`` with ``K' = K + 1`` for
    ``"softmax_no_object"`` (the last column is dropped after the softmax), else ``K``;
    ``outputs["pred_boxes"] (Tensor[B, Q, 4])`` cxcywh; ``targets[b]["class_labels"]`` (int64
    ``[N_b]``) and ``targets[b]["boxes"]`` (``[N_b, 4]``). With ``group_detr = G > 1`` (Group
    DETR, LW-DETR's training queries) the ``Q`` queries are ``G`` consecutive groups matched
    independently, and each group's indices are offset by its start. A softmax probability ``p``
    is handed to the matcher as ``logit(p)``, so that the matcher's ``sigmoid`` gives ``p``
    back (clamped to ``[1e-6, 1 - 1e-6]``).
    """

    def __init__(self, class_score: str = "sigmoid", matcher: nn.Module | None = None) -> None:
        super().__init__()
        if class_score not in CLASS_SCORES:
            raise ValueError(f"class_score must be one of {CLASS_SCORES}, received {class_score!r}")
        if matcher is not None and not callable(matcher):
            raise TypeError(f"matcher must be callable, received {type(matcher).__name__}")
        self.class_score = class_score
        self.matcher = matcher if matcher is not None else OneToManyMatcher()

    def extra_repr(self) -> str:
        return f"class_score={self.class_score!r}"

    def match_logits(self, logits: Tensor, label_maps=None) -> Tensor:
        """``Tensor[B, Q, K]`` whose sigmoid is the family's class probability, from the
        family's ``logits (Tensor[B, Q, K'])`` (``"text_tokens"``: ``K'`` text tokens and
        ``label_maps``, ``B`` tensors ``[K_b, K']``, phrase -> tokens; ``K = max K_b``)."""
        if self.class_score == "text_tokens":
            return _phrase_logits(logits, label_maps)
        if self.class_score == "sigmoid":
            return logits
        prob = logits.float().softmax(-1)
        if self.class_score == "softmax_no_object":
            prob = prob[..., :-1]
        return torch.logit(prob, eps=_EPS)

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping], group_detr: int = 1
    ) -> list[tuple[Tensor, Tensor]]:
        """One-to-many pairs per image; see the class docstring for shapes."""
        for key in ("logits", "pred_boxes"):
            if not isinstance(outputs.get(key), Tensor):
                raise ValueError(
                    f"HostMatcher: outputs has no tensor {key!r} (keys: {sorted(outputs)})"
                )
        logits, boxes = outputs["logits"], outputs["pred_boxes"]
        q = logits.shape[1]
        if isinstance(group_detr, bool) or not isinstance(group_detr, int) or group_detr < 1:
            raise ValueError(
                f"HostMatcher: group_detr must be an int >= 1, received {group_detr!r}"
            )
        if q % group_detr:
            raise ValueError(
                f"HostMatcher: group_detr={group_detr} must divide the number of queries, Q = {q}"
            )
        scores = self.match_logits(logits, outputs.get("label_maps"))
        ours = []
        for i, t in enumerate(targets):
            if "class_labels" not in t or "boxes" not in t:
                raise ValueError(
                    f"HostMatcher: targets[{i}] must hold 'class_labels' and 'boxes' "
                    f"(transformers' labels), received keys {sorted(t)}"
                )
            ours.append({"labels": t["class_labels"], "boxes": t["boxes"]})
        size = q // group_detr
        per_group = []
        for start in range(0, q, size):
            part = {
                "pred_logits": scores[:, start : start + size],
                "pred_boxes": boxes[:, start : start + size],
            }
            per_group.append([(p + start, g) for p, g in self.matcher(part, ours)])
        return [
            (torch.cat([g[b][0] for g in per_group]), torch.cat([g[b][1] for g in per_group]))
            for b in range(len(ours))
        ]
