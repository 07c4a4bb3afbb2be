"""``match_all``: every matching problem of a call, with one device read and one write back.

A criterion call matches every route's every layer (and the encoder proposals) against the same
targets. :func:`match_all` takes them all as :class:`Problem` s, stacks those of one matcher and
one shape along the batch axis (the 6 decoder layers of a route become one ``[6B, Q, K]``
problem, one set of cost kernels), lets each matcher build a device-side plan
(:meth:`HungarianMatcher.plan`, :meth:`OneToManyMatcher.plan`: costs, selections and validation
flags computed on the device with no host read), reads every plan's tensors and the caller's
flags with one :func:`~mrdetr.matching.transfer.to_host`, solves on the host, and sends every
problem's pairs back with one :func:`~mrdetr.matching.transfer.to_device`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import transfer
from .inputs import PackedTargets, check_values, value_flags

__all__ = ["Matched", "PaddedTargets", "Problem", "match_all", "plannable"]


@dataclass
class Problem:
    """One matching problem: ``matcher`` (a plannable matcher, see :func:`plannable`) on
    validated ``logits (Tensor[B, Q, K])`` and ``boxes (Tensor[B, Q, 4])``."""

    matcher: object
    logits: Tensor
    boxes: Tensor


@dataclass
class PaddedTargets:
    """Targets padded per image: ``labels (Tensor[B, N], int64)``, ``boxes (Tensor[B, N, 4])``,
    ``mask (Tensor[B, N], bool)`` (False on padding) and ``sizes`` (``N_b`` per image)."""

    labels: Tensor
    boxes: Tensor
    mask: Tensor
    sizes: list[int]

    def repeat(self, times: int) -> PaddedTargets:
        """The same targets for ``times`` stacked copies of the batch (``[times * B, N]``)."""
        if times == 1:
            return self
        return PaddedTargets(
            self.labels.repeat(times, 1),
            self.boxes.repeat(times, 1, 1),
            self.mask.repeat(times, 1),
            self.sizes * times,
        )


@dataclass
class Matched:
    """One problem's pairs on the device: ``rows (Tensor[4, M], int64)`` = image, prediction,
    gt within its image, and gt in the concatenated targets of every pair, image after image;
    ``counts``: pairs per image (host ints)."""

    rows: Tensor
    counts: list[int]

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(pred_idx (Tensor[M_b]), gt_idx (Tensor[M_b]))`` (views)."""
        pred, gt = self.rows[1].split(self.counts), self.rows[2].split(self.counts)
        return list(zip(pred, gt, strict=True))

    def flat(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(image_idx, pred_idx, gt_idx)``, ``Tensor[M]`` each, ``gt_idx`` into the
        concatenated targets (as :func:`~mrdetr.matching.indices.flatten_indices`)."""
        return self.rows[0], self.rows[1], self.rows[3]


def plannable(matcher: object) -> bool:
    """Whether ``matcher`` is matched through :func:`match_all`: its own class (not only a base)
    declares ``_plans = True`` and a ``plan`` method, so a subclass that customises matching
    (e.g. adds mask costs in ``match_packed``) is called as a plain callable instead."""
    return vars(type(matcher)).get("_plans", False) is True


def pad(packed: PackedTargets, num_classes: int) -> PaddedTargets:
    """Pad ``packed`` per image without reading the device (see :class:`PaddedTargets`);
    labels are clamped to ``[0, num_classes)`` (invalid ones are flagged and raise after the
    read; the clamp keeps the cost kernels' gathers in range until then)."""
    sizes = list(packed.sizes)
    labels = packed.labels.clamp(0, num_classes - 1)
    pad_ = torch.nn.utils.rnn.pad_sequence
    ones = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    return PaddedTargets(
        pad_(list(labels.split(sizes)), batch_first=True),
        pad_(list(packed.boxes.split(sizes)), batch_first=True),
        pad_(list(ones.split(sizes)), batch_first=True),
        sizes,
    )


def match_all(
    problems: Sequence[Problem],
    packed: PackedTargets,
    num_classes: int,
    who: str,
    flags: Sequence[Tensor] = (),
    check: Callable[[list[bool]], None] | None = None,
) -> tuple[list[Matched], list[bool]]:
    """Match every problem against ``packed`` (validated for structure, not yet for values).

    Args:
        problems: the problems, each on a batch of ``B = len(packed.sizes)`` images.
        packed: the targets; their values (labels in ``[0, num_classes)``, finite boxes, ...)
            are checked with flags read in the same transfer; a failure raises the
            ``ValueError`` of :func:`~mrdetr.matching.inputs.check_values`, prefixed ``who``.
        flags: more device ``bool`` tensors (the caller's checks), read in the same transfer.
        check: called with ``any()`` of each of ``flags`` (host bools) after the value checks
            and before the host solves, to raise the caller's errors in that order.

    Returns:
        one :class:`Matched` per problem, and ``any()`` of each of ``flags``.
    """
    device = packed.labels.device
    b = len(packed.sizes)
    padded = pad(packed, num_classes) if packed.max_size > 0 else None
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        if padded is None or p.logits.shape[1] == 0:
            continue
        key = (id(p.matcher), tuple(p.logits.shape), p.logits.dtype, p.boxes.dtype)
        groups.setdefault(key, []).append(i)
    plans = []
    for members in groups.values():
        first = problems[members[0]]
        logits = torch.cat([problems[i].logits.detach() for i in members])
        boxes = torch.cat([problems[i].boxes.detach() for i in members])
        plan = first.matcher.plan(logits, boxes, padded.repeat(len(members)), b)
        plans.append((members, plan))
    checks = [value_flags(packed, num_classes)] + [f.any() for f in flags]
    reads = transfer.to_host(checks + [t for _, plan in plans for t in plan.host])
    if reads[0]:
        check_values(packed, num_classes, who)  # the error path: locate and raise
    got = [bool(f.any()) for f in reads[1 : len(checks)]]
    if check is not None:
        check(got)
    pairs: list[list | None] = [None] * len(problems)
    start = len(checks)
    for members, plan in plans:
        n = len(plan.host)
        found = plan.finish(reads[start : start + n])
        start += n
        for j, i in enumerate(members):
            pairs[i] = found[j * b : (j + 1) * b]
    empty = np.zeros(0, dtype=np.int64)
    offsets = np.cumsum([0, *packed.sizes])
    arrays, counts = [], []
    for per_image in pairs:
        per_image = per_image or [(empty, empty)] * b
        image = [np.full(len(p), i, dtype=np.int64) for i, (p, _) in enumerate(per_image)]
        flat_gt = [g + offsets[i] for i, (_, g) in enumerate(per_image)]
        rows = [np.concatenate(image or [empty])]
        rows += [np.concatenate([x[k] for x in per_image] or [empty]) for k in (0, 1)]
        rows.append(np.concatenate(flat_gt or [empty]))
        arrays.append(np.stack(rows).astype(np.int64))
        counts.append([len(p) for p, _ in per_image])
    moved = transfer.to_device(arrays, device)
    out = [Matched(m, c) for m, c in zip(moved, counts, strict=True)]
    return out, got
