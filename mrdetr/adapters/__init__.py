"""Adapters: mrdetr's kernels and training routes on decoders from other codebases."""

from .fast_attention import restore_deformable_attention, use_fast_deformable_attention

__all__ = ["restore_deformable_attention", "use_fast_deformable_attention"]
