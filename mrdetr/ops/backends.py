"""Which ``ms_deform_attn`` backends can run here, and why the others cannot."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _build

__all__ = ["BackendStatus", "available_backends", "build"]


class BackendStatus(NamedTuple):
    """Whether a backend can run (``available``) and the reason (how it was built / why not)."""

    available: bool
    reason: str


def available_backends() -> dict[str, BackendStatus]:
    """Status of every backend: ``{"pytorch": ..., "cpu": ..., "cuda": ...}``.

    Builds the CPU extension (and the CUDA one when a GPU is visible) if that was not done yet,
    so the first call may take a minute; later calls and processes reuse the build cache.
    """
    out = {"pytorch": BackendStatus(True, "pure-PyTorch reference, always available")}
    out["cpu"] = BackendStatus(*_build.load("cpu"))
    if torch.cuda.is_available():
        out["cuda"] = BackendStatus(*_build.load("cuda"))
    else:
        why = "no CUDA device visible (torch.cuda.is_available() is False)"
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        out["cuda"] = BackendStatus(False, why)
    return out


def build(cuda: bool = False) -> dict[str, BackendStatus]:
    """Build the CPU extension (and the CUDA one with ``cuda=True``, GPU or not) into the cache.

    Meant for Docker images: ``python -m mrdetr.ops build --cuda`` at image build time, with
    ``TORCH_CUDA_ARCH_LIST`` set to the target GPUs when the build machine has none.

    Returns:
        ``{"cpu": BackendStatus, "cuda": BackendStatus}`` (``"cuda"`` only when asked).
    """
    out = {"cpu": BackendStatus(*_build.load("cpu"))}
    if cuda:
        out["cuda"] = BackendStatus(*_build.load("cuda"))
    return out
