"""Which ``ms_deform_attn`` backends can run here and why the others cannot; building them."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _build

__all__ = ["BackendStatus", "available_backends", "build"]


class BackendStatus(NamedTuple):
    """A backend's state.

    ``available``: it runs here (now, or after its first-use build); ``reason``: how it was
    built, what its first use will do, or why it cannot run; ``built``: it needs no compiling
    (loaded, or a verified library in the build cache).
    """

    available: bool
    reason: str
    built: bool = False


def available_backends() -> dict[str, BackendStatus]:
    """Status of every backend: ``{"pytorch": ..., "cpu": ..., "cuda": ...}``.

    A pure query: it compiles and loads nothing (use :func:`build` or the first call for that).
    A backend that is not built yet is reported ``available`` when its toolchain is present,
    with ``built=False``; a build can still fail on a compiler error, which the first call then
    reports.
    """
    out = {"pytorch": BackendStatus(True, "pure-PyTorch reference, always available", True)}
    out["cpu"] = BackendStatus(*_build.probe("cpu"))
    if torch.version.cuda is None:
        out["cuda"] = BackendStatus(False, f"torch {torch.__version__} is a CPU-only build")
    elif not torch.cuda.is_available():
        _, reason, built = _build.probe("cuda")
        why = "no CUDA device visible (torch.cuda.is_available() is False)"
        out["cuda"] = BackendStatus(False, f"{why}; library: {reason}", built)
    else:
        out["cuda"] = BackendStatus(*_build.probe("cuda"))
    return out


def build(cuda: bool = False) -> dict[str, BackendStatus]:
    """Build and load the CPU library (and the CUDA one with ``cuda=True``, GPU or not).

    Meant for Docker images: ``python -m mrdetr.ops build --cuda`` at image build time, with
    ``TORCH_CUDA_ARCH_LIST`` set to the target GPUs when the build machine has none. The CUDA
    library does not need the CPU one.

    Returns:
        ``{"cpu": BackendStatus, "cuda": BackendStatus}`` (``"cuda"`` only when asked).
    """
    out = {}
    for kind in ("cpu", "cuda") if cuda else ("cpu",):
        ok, reason = _build.load(kind)
        out[kind] = BackendStatus(ok, reason, ok)
    return out
