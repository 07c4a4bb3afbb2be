"""``Matcher``: the small base of the matchers: validate the inputs, then match.

Subclasses implement :meth:`Matcher.match_packed` on validated predictions and packed targets
(and :meth:`Matcher.extra_inputs` when they need more of ``outputs``/``targets``, e.g. masks);
the base does what every matcher did before it: check ``outputs`` and ``targets``
(:mod:`~mrdetr.matching.inputs`), detach, run without autograd, pick the working dtype
(:func:`working_dtype`), own a bounded scratch :class:`~mrdetr.matching.workspace.Workspace`,
and apply the threading rule below.

Threading rule: on CPU, matching runs with one intra-op thread. Each of the ~25 elementwise ops
of a cost block is otherwise an OpenMP parallel region; with libgomp's default spin-waiting, on a
machine whose cores other processes keep busy, a region waits for a descheduled worker for a
whole scheduler tick (4-12 ms), which made the batched matcher 15-50x slower than matching image
by image. The blocks are computed in chunks of at most the workspace's ``max_bytes``
(:func:`~mrdetr.matching.workspace.fill_blocks`), so no single op is large enough to repay that
risk, and the scipy solve that follows is serial anyway (figures in ``docs/benchmarks.md``).
Only the calling thread is affected (OpenMP's thread count is per-thread), and it is restored on
exit. On CUDA nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .batch import Problem, match_all, plannable
from .indices import MatchIndices, empty_indices
from .inputs import PackedTargets, check_predictions, pack_targets
from .workspace import MAX_BYTES, Workspace

__all__ = ["Matcher", "single_thread", "working_dtype"]


def working_dtype(boxes: Tensor) -> torch.dtype:
    """Dtype of the cost blocks for predictions ``boxes``: float64 for float64 input, else
    float32 (half-precision predictions are matched in float32)."""
    return torch.float64 if boxes.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def single_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one intra-op thread in the calling thread when ``device`` is the CPU
    (see the module docstring); otherwise change nothing."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Matcher(nn.Module):
    """Base of the matchers: ``matcher(outputs, targets) -> MatchIndices``.

    ``outputs = {"pred_logits": Tensor[B, Q, K], "pred_boxes": Tensor[B, Q, 4]}`` (cxcywh),
    ``targets`` a list of ``B`` dicts ``{"labels": Tensor[N_b] int64, "boxes": Tensor[N_b, 4]}``.
    Returns one ``(pred_idx, gt_idx)`` pair of int64 tensors per image on the predictions'
    device. Subclasses implement :meth:`match_packed` (and :meth:`extra_inputs` for inputs beyond
    logits, boxes and labels); they have no parameters, so copies
    (``copy.deepcopy``, ``pickle``, ``torch.save``) are cheap and match identically.

    Args:
        workspace_bytes: bound of the scratch memory kept between calls, per thread and device
            (see :mod:`~mrdetr.matching.workspace`).
    """

    def __init__(self, *, workspace_bytes: int = MAX_BYTES) -> None:
        super().__init__()
        self._workspace = Workspace(workspace_bytes)

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping]) -> MatchIndices:
        """Validate, then :meth:`match_packed`; see the class docstring for shapes."""
        who = type(self).__name__
        logits, boxes = check_predictions(outputs, who)
        b, q, k = logits.shape
        if plannable(self):  # one device read and one write for the whole call
            packed = pack_targets(targets, b, k, boxes, who, values=False)
            self.extra_inputs(outputs, targets, packed)
            with single_thread(logits.device):
                (matched,), _ = match_all([Problem(self, logits, boxes)], packed, k, who)
            return matched.pairs()
        packed = pack_targets(targets, b, k, boxes, who)
        extra = self.extra_inputs(outputs, targets, packed)
        if packed.max_size == 0 or q == 0:
            return [empty_indices(logits.device) for _ in range(b)]
        with single_thread(logits.device):
            return self.match_packed(logits.detach(), boxes.detach(), packed, **extra)

    def extra_inputs(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping], packed: PackedTargets
    ) -> dict:
        """Validate what a subclass needs beyond logits, boxes and labels (``outputs`` and
        ``targets`` as given to :meth:`forward`; ``packed`` the validated targets) and return it
        as keyword arguments of :meth:`match_packed`, detached. Runs before the empty case, so
        bad input is reported whatever the batch holds. Default: nothing."""
        return {}

    def match_packed(self, logits: Tensor, boxes: Tensor, packed: PackedTargets) -> MatchIndices:
        """(Matchers whose class declares ``_plans = True`` implement ``plan`` instead; see
        :func:`~mrdetr.matching.batch.match_all`.) Match validated, detached ``logits
        (Tensor[B, Q, K])`` and ``boxes (Tensor[B, Q, 4])``
        (``Q > 0``) with validated ``packed`` targets (at least one gt in the batch), plus the
        keyword arguments :meth:`extra_inputs` returned."""
        raise NotImplementedError
