"""``Plan``: a matcher's device-side work for :func:`~mrdetr.matching.batch.match_all`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

__all__ = ["Plan"]


@dataclass
class Plan:
    """What a matcher computed on the device for stacked problems (``S*B`` images).

    Attributes:
        host: device tensors the host needs (cost blocks, selections, flags); read together with
            every other plan's by one :func:`~mrdetr.matching.transfer.to_host`.
        finish: ``finish(arrays) -> pairs``: from ``host``'s arrays (same order, float32 or
            bool), per stacked image ``(pred_idx, gt_idx)`` int64 ndarrays; raises the
            matcher's ``ValueError`` for non-finite input (reading the device on that path).
    """

    host: list[Tensor]
    finish: Callable[[list[np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]
