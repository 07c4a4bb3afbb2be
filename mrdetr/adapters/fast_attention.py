"""Run HF transformers' deformable-attention models on mrdetr's compiled ``ms_deform_attn`` kernels.

HF's Deformable-DETR family (``DeformableDetr...``, ``RTDetr...`` and the models built from the
same code) computes the multi-scale sampling in a parameter-free sub-module of class
``MultiScaleDeformableAttention`` (the ``attn`` attribute of every
``...MultiscaleDeformableAttention``), in pure PyTorch: one ``grid_sample`` per level.
:func:`use_fast_deformable_attention` puts a :class:`FastDeformableSampling` in its place, which
calls :func:`mrdetr.ops.ms_deform_attn` (CPU kernel, CUDA kernel, PyTorch reference as fallback).
Nothing else changes: the projections, the parameters and therefore the ``state_dict`` stay the
same, so checkpoints saved either way load into the other.
:func:`restore_deformable_attention` puts HF's modules back.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import BACKENDS, ms_deform_attn

__all__ = [
    "FastDeformableSampling",
    "restore_deformable_attention",
    "use_fast_deformable_attention",
]

_HF_CLASS = "MultiScaleDeformableAttention"


class FastDeformableSampling(nn.Module):
    """Drop-in for HF's ``MultiScaleDeformableAttention`` sampling module, on ``ms_deform_attn``.

    Holds no parameters. The module it replaced is kept (not as a sub-module, so it adds nothing
    to ``state_dict`` or ``named_modules``) for :func:`restore_deformable_attention`.

    Args:
        backend: ``ms_deform_attn`` backend (``"auto"``, ``"pytorch"``, ``"cpu"``, ``"cuda"``).
        replaced: the HF module this one stands in for (None when built directly).
    """

    def __init__(self, backend: str = "auto", replaced: nn.Module | None = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._replaced = (replaced,)  # a tuple: not registered as a sub-module

    @property
    def replaced(self) -> nn.Module | None:
        """The HF module this one replaced (None when built directly)."""
        return self._replaced[0]

    def forward(
        self,
        value: Tensor,
        value_spatial_shapes: Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: int = 64,
    ) -> Tensor:
        """HF's signature; ``im2col_step`` is not needed.

        Args:
            value (Tensor[B, S, H, D]): projected value maps, flattened over the levels.
            value_spatial_shapes (Tensor[L, 2], int64): ``(h, w)`` of every level.
            value_spatial_shapes_list: the same as Python ints (HF passes it): the op's checks
                use it, so the call reads nothing from the device.
            level_start_index (Tensor[L], int64): start of every level in ``S``.
            sampling_locations (Tensor[B, Q, H, L, P, 2]): normalised ``(x, y)``.
            attention_weights (Tensor[B, Q, H, L, P]): softmaxed weights.
            im2col_step: unused (HF passes it for the original CUDA kernel).

        Returns:
            Tensor[B, Q, H * D].
        """
        return ms_deform_attn(
            value,
            value_spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            backend=self.backend,
            spatial_shapes_list=value_spatial_shapes_list,
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def _is_hf_sampling(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == _HF_CLASS and cls.__module__.startswith("transformers.")


def _replace_children(model: nn.Module, pick, make) -> int:
    """Replace every sub-module ``m`` with ``pick(m)`` by ``make(m)``; returns how many."""
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if pick(child):
                setattr(parent, name, make(child))
                count += 1
    return count


def use_fast_deformable_attention(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Swap HF's pure-PyTorch deformable sampling for mrdetr's kernels, in place.

    Every sub-module of class ``transformers...MultiScaleDeformableAttention`` (encoder and
    decoder, e.g. ``model.model.decoder.layers[i].encoder_attn.attn``) is replaced by a
    :class:`FastDeformableSampling`. Outputs equal HF's to float32 rounding; the parameters and
    the ``state_dict`` keys are unchanged, so ``save_pretrained``/``from_pretrained`` work as
    before (a model loaded with ``from_pretrained`` is a fresh HF model: call this again).
    Calling it twice is harmless (already swapped modules only get the new ``backend``).

    Args:
        model: an HF model or any module containing HF deformable-attention layers
            (``DeformableDetrForObjectDetection``, ``RTDetrForObjectDetection``, their
            ``...Model``, a bare decoder or layer).
        backend: ``ms_deform_attn`` backend; ``"auto"`` picks the compiled kernel of the
            inputs' device (built on first use) and falls back to the PyTorch reference with one
            warning.

    Returns:
        ``model`` (modified in place).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown ``backend``, or ``model`` holds no HF ``MultiScaleDeformableAttention``
            (nor an already swapped one).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    swapped = 0
    for module in model.modules():
        if isinstance(module, FastDeformableSampling):
            module.backend = backend
            swapped += 1
    made = _replace_children(
        model, _is_hf_sampling, lambda m: FastDeformableSampling(backend, replaced=m)
    )
    if made + swapped == 0:
        raise ValueError(
            f"model ({type(model).__name__}) holds no HF transformers {_HF_CLASS} module "
            "(the `attn` of DeformableDetr/RTDetr ...MultiscaleDeformableAttention layers); "
            "nothing to swap"
        )
    return model


def restore_deformable_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`use_fast_deformable_attention`: put HF's own sampling modules back, in place.

    Returns:
        ``model``. A model without swapped modules is returned unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _replace_children(
        model,
        lambda m: isinstance(m, FastDeformableSampling) and m.replaced is not None,
        lambda m: m.replaced,
    )
    return model
