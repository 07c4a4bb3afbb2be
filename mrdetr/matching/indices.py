"""Match indices: the ``(pred_idx, gt_idx)`` pairs every matcher returns, and their validation.

A matcher returns, per image ``b``, ``(pred_idx (Tensor[M_b]), gt_idx (Tensor[M_b]))`` of int64
indices into that image's ``Q`` predictions and ``N_b`` gts. :func:`flatten_indices` is the
boundary where indices from any matcher (ours or user-supplied) enter the losses: it checks them
and turns them into flat batch indices, so that an index past an image's gts raises instead of
silently pointing at the next image's gts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "MatchIndices",
    "empty_indices",
    "flatten_indices",
    "flatten_unchecked",
    "gt_offsets",
    "raise_out_of_range",
]

MatchIndices = list[tuple[Tensor, Tensor]]
"""Per image ``b``: ``(pred_idx (Tensor[M_b], int64), gt_idx (Tensor[M_b], int64))``."""


def empty_indices(device: torch.device) -> tuple[Tensor, Tensor]:
    """An empty ``(pred_idx, gt_idx)`` pair: two int64 ``Tensor[0]`` on ``device``."""
    e = torch.zeros(0, dtype=torch.int64, device=device)
    return e, e.clone()


def _check_pair(i: int, pair: object, who: str) -> tuple[Tensor, Tensor]:
    ok = isinstance(pair, Sequence) and len(pair) == 2
    if not ok or not all(isinstance(t, Tensor) for t in pair):
        raise ValueError(
            f"{who}: image {i}: the matcher must return a (pred_idx, gt_idx) pair of tensors, "
            f"received {type(pair).__name__}"
        )
    p, g = pair
    if p.dim() != 1 or p.shape != g.shape:
        raise ValueError(
            f"{who}: image {i}: matcher returned pred_idx {tuple(p.shape)} and gt_idx "
            f"{tuple(g.shape)}; expected two int64 [M]"
        )
    for name, t in (("pred_idx", p), ("gt_idx", g)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"{who}: image {i}: matcher returned {name} of dtype {t.dtype}; expected int64"
            )
    return p, g


def flatten_unchecked(
    indices: object, sizes: Sequence[int], num_queries: int, device: torch.device, who: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`flatten_indices` without its device read: structure, dtypes and shapes are checked
    (host only), the ranges are returned as a flag for the caller to read with other data.

    Returns:
        ``(image_idx, pred_idx, gt_idx, bad)``: int64 ``Tensor[M]`` on ``device``, ``gt_idx``
        within each image (not yet offset), and ``bad (Tensor[M], bool)``, True where an index
        is outside ``[0, Q)`` or ``[0, N_b)``.
    """
    b = len(sizes)
    if isinstance(indices, Mapping) or not isinstance(indices, Sequence):
        raise ValueError(
            f"{who}: the matcher must return a list of {b} (pred_idx, gt_idx) pairs, received "
            f"{type(indices).__name__}"
        )
    if len(indices) != b:
        raise ValueError(f"{who}: matcher returned {len(indices)} index pairs for {b} images")
    pairs = [_check_pair(i, pair, who) for i, pair in enumerate(indices)]
    counts = [p.shape[0] for p, _ in pairs]
    if sum(counts) == 0:
        e = torch.zeros(0, dtype=torch.int64, device=device)
        return e, e.clone(), e.clone(), torch.zeros(0, dtype=torch.bool, device=device)
    pred = torch.cat([p.to(device, torch.int64) for p, _ in pairs])
    gt = torch.cat([g.to(device, torch.int64) for _, g in pairs])
    image = torch.cat(
        [torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(counts)]
    )
    size = torch.cat(
        [
            torch.full((n,), s, dtype=torch.int64, device=device)
            for s, n in zip(sizes, counts, strict=True)
        ]
    )
    bad = (pred < 0) | (pred >= num_queries) | (gt < 0) | (gt >= size)
    return image, pred, gt, bad


def flatten_indices(
    indices: object, sizes: Sequence[int], num_queries: int, device: torch.device, who: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a matcher's ``indices`` and flatten them over the batch.

    Args:
        indices: per image ``(pred_idx (Tensor[M_b]), gt_idx (Tensor[M_b]))``, ``B`` pairs.
        sizes: number of gts ``N_b`` of every image (``B`` ints).
        num_queries: predictions per image ``Q``.
        device: where the results go.
        who: prefix of error messages.

    Returns:
        ``(image_idx, pred_idx, gt_idx)``, int64 ``Tensor[M]`` with ``M = sum(M_b)`` on
        ``device``; ``gt_idx`` indexes the concatenation of all images' gts.

    Raises ``ValueError`` for a wrong structure, dtype or shape, and for any ``pred_idx`` outside
    ``[0, Q)`` or ``gt_idx`` outside ``[0, N_b)`` (one device read for the range check;
    :func:`flatten_unchecked` leaves that read to the caller).
    """
    image, pred, gt, bad = flatten_unchecked(indices, sizes, num_queries, device, who)
    if bool(bad.any()):  # the one read
        raise_out_of_range(image, pred, gt, bad, sizes, num_queries, who)
    return image, pred, gt + gt_offsets(sizes, device)[image]


def gt_offsets(sizes: Sequence[int], device: torch.device) -> Tensor:
    """First gt of every image in the concatenated targets, int64 ``Tensor[B]``."""
    size = torch.tensor(list(sizes), dtype=torch.int64, device=device)
    return torch.cumsum(size, 0) - size


def raise_out_of_range(image, pred, gt, bad, sizes, num_queries: int, who: str) -> None:
    """Raise the ``ValueError`` of :func:`flatten_indices` for the first ``bad`` index."""
    j = int(bad.nonzero()[0, 0])
    i, p, g = int(image[j]), int(pred[j]), int(gt[j])
    if not 0 <= p < num_queries:
        what = f"pred_idx {p} outside [0, Q={num_queries})"
    else:
        what = f"gt_idx {g} outside [0, N={sizes[i]}) (the image's gts)"
    raise ValueError(f"{who}: image {i}: matcher returned {what}")
