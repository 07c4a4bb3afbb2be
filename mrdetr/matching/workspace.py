"""Reusable scratch buffers for the matchers' cost blocks.

A matcher's cost blocks are ``[B, N, Q]`` (16 x 30 x 900 floats = 1.7 MB for DETR-sized batches).
Allocating a handful of fresh ones per call costs more than the arithmetic on them on CPU: the
memory is returned to the OS between calls and every call page-faults it back in. The workspace
keeps one flat buffer per thread and device and hands out views of it, so repeated calls reuse
the same memory. Buffers never leave the matcher: results are always fresh tensors.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

__all__ = ["Workspace"]


class Workspace:
    """Per-thread scratch memory: ``buffers(count, shape, dtype, device)`` returns ``count``
    non-overlapping ``Tensor[*shape]`` views (uninitialised), valid until the next call from the
    same thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def buffers(
        self, count: int, shape: tuple[int, ...], dtype: torch.dtype, device
    ) -> list[Tensor]:
        """``count`` scratch tensors of ``shape``; see the class docstring."""
        numel = math.prod(shape)
        store: dict = self._local.__dict__.setdefault("store", {})
        key = (dtype, torch.device(device))
        flat = store.get(key)
        if flat is None or flat.numel() < count * numel:
            flat = torch.empty(count * numel, dtype=dtype, device=device)
            store[key] = flat
        return [flat[i * numel : (i + 1) * numel].view(shape) for i in range(count)]

    def clear(self) -> None:
        """Release this thread's buffers."""
        self._local.__dict__.pop("store", None)
