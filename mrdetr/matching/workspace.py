"""Reusable, bounded scratch buffers for the matchers' cost blocks.

A matcher's cost blocks are ``[B, N, Q]`` (16 x 30 x 900 floats = 1.7 MB for DETR-sized batches).
Allocating a handful of fresh ones per call costs more than the arithmetic on them on CPU: the
memory is returned to the OS between calls and every call page-faults it back in. The workspace
keeps one flat buffer per thread, device and dtype and hands out views of it, so repeated calls
reuse the same memory.

The memory kept is bounded by ``max_bytes`` (default :data:`MAX_BYTES`, per thread and device):
a request above it gets fresh memory that is freed when the caller drops it, and
:func:`fill_blocks` splits a large block along the gt axis into chunks whose scratch fits, so a
large problem (H-DETR's repeated gts, thousands of queries) no longer pins its high-water mark for
the matcher's lifetime. Buffers never leave the matcher: results are fresh tensors or copies.

Copying or pickling a workspace (``copy.deepcopy``, ``pickle``, ``torch.save`` of a matcher or of
a model holding one) keeps ``max_bytes`` and drops the buffers.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["MAX_BYTES", "Workspace", "fill_blocks"]

MAX_BYTES = 32 * 2**20
"""Default bound of the scratch memory a workspace keeps between calls (per thread and device)."""


class Workspace:
    """Per-thread scratch memory: ``buffers(count, shape, dtype, device)`` returns ``count``
    non-overlapping ``Tensor[*shape]`` views (uninitialised), valid until the next call from the
    same thread. At most ``max_bytes`` per thread, device and dtype is kept between calls."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"Workspace: max_bytes must be an int >= 0, received {max_bytes!r}")
        self.max_bytes = max_bytes
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])

    def _store(self) -> dict:
        return self._local.__dict__.setdefault("store", {})

    def buffers(
        self, count: int, shape: tuple[int, ...], dtype: torch.dtype, device
    ) -> list[Tensor]:
        """``count`` scratch tensors of ``shape``; see the class docstring."""
        numel = math.prod(shape)
        need = count * numel
        if need * dtype.itemsize > self.max_bytes:
            flat = torch.empty(need, dtype=dtype, device=device)  # not kept
        else:
            # inference tensors cannot be updated outside inference mode (and vice versa)
            key = (dtype, torch.device(device), torch.is_inference_mode_enabled())
            store = self._store()
            flat = store.get(key)
            if flat is None or flat.numel() < need:
                store.pop(key, None)  # free the old buffer before allocating the larger one
                flat = torch.empty(need, dtype=dtype, device=device)
                store[key] = flat
        return [flat[i * numel : (i + 1) * numel].view(shape) for i in range(count)]

    def rows_per_chunk(self, count: int, row_numel: int, dtype: torch.dtype) -> int:
        """Rows of ``row_numel`` elements such that ``count`` buffers of that many rows fit
        ``max_bytes`` (at least 1)."""
        return max(1, self.max_bytes // max(1, count * row_numel * dtype.itemsize))

    def nbytes(self) -> int:
        """Bytes this thread's workspace keeps between calls."""
        return sum(t.numel() * t.element_size() for t in self._store().values())

    def clear(self) -> None:
        """Release this thread's buffers."""
        self._local.__dict__.pop("store", None)


def fill_blocks(
    workspace: Workspace,
    count: int,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    device,
    fill: Callable[[list[Tensor], slice], None],
) -> Tensor:
    """Compute a gt-major block ``Tensor[B, N, Q]`` chunk by chunk along ``N``.

    ``fill(buffers, rows)`` must write the block's rows ``rows`` (a slice of ``N``) into
    ``buffers[0]`` (``Tensor[B, rows, Q]``), using ``buffers[1:]`` (``count - 1`` more of the
    same shape) as scratch. When one chunk covers ``N`` the result is ``buffers[0]`` itself (a
    workspace view, valid until the next call); otherwise it is a fresh tensor.
    """
    b, n, q = shape
    rows = workspace.rows_per_chunk(count, b * q, dtype)
    if rows >= n:
        bufs = workspace.buffers(count, (b, n, q), dtype, device)
        fill(bufs, slice(0, n))
        return bufs[0]
    out = torch.empty(b, n, q, dtype=dtype, device=device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        bufs = workspace.buffers(count, (b, stop - start, q), dtype, device)
        fill(bufs, slice(start, stop))
        out[:, start:stop].copy_(bufs[0])
    return out
