"""Compiled ops: multi-scale deformable attention with CPU/CUDA kernels and a PyTorch reference."""

from . import _library  # noqa: F401  defines the op schema, fake kernels and autograd
from ._dispatch import BACKENDS, ms_deform_attn
from ._reference import ms_deform_attn_reference
from .backends import available_backends, build

__all__ = [
    "BACKENDS",
    "available_backends",
    "build",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]
