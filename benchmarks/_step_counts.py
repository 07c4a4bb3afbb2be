"""What one train step costs besides its time: ATen operations, host reads, GPU busy time.

``count_step(step)`` runs ``step()`` once under :class:`mrdetr.profiling.OpCounter`: the ATen
operations (each one kernel launch, or more, on a GPU) and the operations that force a
device-to-host read (each a ``cudaStreamSynchronize`` on a GPU). These counts are the same on
any machine for the same code and shapes, so the CPU figures stand for the GPU's.
``gpu_busy_ms(step)`` sums the CUDA kernels' own durations of one step from ``torch.profiler``:
the GPU's work, without the time it waits for the host.
"""

from __future__ import annotations

import torch

from mrdetr.profiling import OpCounter

__all__ = ["count_step", "gpu_busy_ms", "sync"]


def sync(device: str) -> None:
    """Wait for ``device``'s queue (a no-op on the CPU), so a host timer covers the work."""
    if device == "cuda":
        torch.cuda.synchronize()


def count_step(step) -> tuple[int, int]:
    """``(ATen operations, host reads)`` of one call of ``step()``."""
    with OpCounter() as counter:
        step()
    return counter.ops, counter.host_reads


def gpu_busy_ms(step) -> float:
    """Milliseconds the GPU's kernels ran during one call of ``step()`` (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e3
