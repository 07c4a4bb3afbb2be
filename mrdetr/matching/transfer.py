"""The matching's device-host boundary: one read of the device, one write back, per call.

Hungarian matching is solved on the host (scipy), so a matcher or criterion call must read its
cost blocks from the device. On a GPU every read is a synchronisation: the host waits for the
device's whole queue, then the device idles while the host launches the next kernels. Matching
therefore collects everything it needs from the device (all cost blocks of all routes and layers,
the one-to-many selections, the validation flags) and reads it with **one** call of
:func:`to_host`; the pairs go back with one call of :func:`to_device`. These two functions are
the only places in ``mrdetr.matching`` and ``mrdetr.criterion`` that move matching data between
device and host (``tests/test_criterion_one_read.py`` holds the criterion to one call of each).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_device", "to_host"]


def to_host(tensors: Sequence[Tensor]) -> list[np.ndarray]:
    """Read ``tensors`` (any shapes, dtypes, one device) to the host in one transfer.

    Everything travels as one flat float32 buffer (costs are solved in float32; indices,
    counts and flags are exact in float32 below ``2**24``), so a GPU waits once.

    Returns:
        one ``float32`` ndarray per tensor, of the tensor's shape (``bool`` tensors come back
        as ``bool`` arrays).
    """
    if not tensors:
        return []
    flat = [t.detach().reshape(-1).to(torch.float32) for t in tensors]
    host = (torch.cat(flat) if len(flat) > 1 else flat[0]).cpu().numpy()
    out, start = [], 0
    for t in tensors:
        part = host[start : start + t.numel()].reshape(t.shape)
        out.append(part.astype(bool) if t.dtype == torch.bool else part)
        start += t.numel()
    return out


def to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[Tensor]:
    """Move int64 ``arrays`` (any shapes) to ``device`` in one transfer (asynchronous from
    pinned memory on CUDA); returns one int64 ``Tensor`` per array, of its shape."""
    if not arrays:
        return []
    flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays])
    host = torch.from_numpy(flat)
    device = torch.device(device)
    if device.type == "cpu":
        moved = host
    else:
        moved = host.pin_memory().to(device, non_blocking=True)
    out, start = [], 0
    for a in arrays:
        n = int(np.prod(np.shape(a), dtype=np.int64))
        out.append(moved[start : start + n].view(np.shape(a)))
        start += n
    return out
