"""``MultiScaleDeformableAttention``: Deformable-DETR's attention module over ``ms_deform_attn``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import ms_deform_attn

__all__ = ["MultiScaleDeformableAttention", "check_levels"]


def check_levels(spatial_shapes: Tensor, level_start_index: Tensor, num_levels: int) -> None:
    """Raise a ``ValueError`` unless ``spatial_shapes`` is ``Tensor[L, 2]`` and
    ``level_start_index`` ``Tensor[L]`` with ``L = num_levels`` (the module's levels). Shapes
    only: the values are checked by :func:`mrdetr.ops.ms_deform_attn`."""
    for name, t, want in (
        ("spatial_shapes", spatial_shapes, (num_levels, 2)),
        ("level_start_index", level_start_index, (num_levels,)),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor{list(want)}, got {type(t).__name__}")
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} must be {list(want)} for num_levels={num_levels} (the layer's levels), "
                f"got {list(t.shape)} ({t.shape[0] if t.dim() else 0} levels)"
            )


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable-DETR, Zhu et al. 2021).

    Every query predicts, per head, level and point, a sampling offset around its reference
    point and an attention weight (softmax over levels x points); the projected value maps are
    sampled there by :func:`mrdetr.ops.ms_deform_attn`. The module returns the attention output
    only: residual, dropout and normalisation belong to the layer that uses it.

    Args:
        embed_dim: channels ``C`` of queries and values; must be divisible by ``num_heads``.
        num_heads: attention heads ``H``.
        num_levels: feature levels ``L``.
        num_points: sampling points ``P`` per head and level.
        batch_first: if False, ``query`` is ``[Q, B, C]``, ``value`` ``[S, B, C]`` and the output
            ``[Q, B, C]``.
        backend: ``ms_deform_attn`` backend ("auto", "pytorch", "cpu", "cuda").
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        *,
        batch_first: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}"
            )
        for name, n in (("num_heads", num_heads), ("num_levels", num_levels)):
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.batch_first = batch_first
        self.backend = backend
        n = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dim, n * 2)
        self.attention_weights = nn.Linear(embed_dim, n)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR's initialisation.

        Offsets start at zero weight and a bias that places head ``h``'s points on a ray at
        angle ``2*pi*h/H`` at distances ``1..P`` (in units of the level's pixel); attention
        weights start uniform; value and output projections are Xavier-uniform with zero bias.
        """
        h, l, p = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(h, dtype=torch.float64) * (2.0 * math.pi / h)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [H, 2]
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(h, 1, 1, 2).repeat(1, l, p, 1)  # [H, L, P, 2]
        grid = grid * torch.arange(1, p + 1, dtype=torch.float64).view(1, 1, p, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        spatial_shapes_list: list[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Attend from ``query`` to the multi-level ``value`` maps.

        Args:
            query (Tensor[B, Q, C]): queries, positional embedding already added.
            reference_points (Tensor[B, Q, L, 2] or Tensor[B, Q, L, 4]): normalised ``(x, y)``
                points, or ``(cx, cy, w, h)`` boxes whose size scales the offsets, per level
                (already multiplied by the valid ratios, as in Deformable-DETR). ``[B, Q, 2|4]``
                is accepted and used for every level.
            value (Tensor[B, S, C]): flattened encoder memory, ``S = sum(h * w)``.
            spatial_shapes (Tensor[L, 2], int64): ``(h, w)`` per level.
            level_start_index (Tensor[L], int64): start of every level in ``S``.
            key_padding_mask (Tensor[B, S], bool, optional): True at padded positions, whose
                values are zeroed.
            spatial_shapes_list: ``spatial_shapes`` as host ``(h, w)`` integers (HF's
                convention). With it the op reads nothing from the device; without it, it reads
                the level tensors once per call (a synchronisation on CUDA).

        Returns:
            Tensor[B, Q, C] (``[Q, B, C]`` when ``batch_first=False``).
        """
        if not self.batch_first:
            query, value = query.transpose(0, 1), value.transpose(0, 1)
        self._check(query, reference_points, value, key_padding_mask)
        check_levels(spatial_shapes, level_start_index, self.num_levels)
        b, q, _ = query.shape
        h, l, p = self.num_heads, self.num_levels, self.num_points
        if reference_points.dim() == 3:
            reference_points = reference_points.unsqueeze(2).expand(-1, -1, l, -1)
        v = self.value_proj(value)
        if key_padding_mask is not None:
            v = v.masked_fill(key_padding_mask[..., None], 0.0)
        v = v.view(b, v.shape[1], h, self.embed_dim // h)  # [B, S, H, D]
        offsets = self.sampling_offsets(query).view(b, q, h, l, p, 2)
        weights = self.attention_weights(query).view(b, q, h, l * p).softmax(-1)
        weights = weights.view(b, q, h, l, p)
        ref = reference_points[:, :, None, :, None, :]  # [B, Q, 1, L, 1, 2|4]
        if reference_points.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (w, h) per level
            locations = ref + offsets / normalizer[None, None, None, :, None, :]
        else:
            locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
        out = ms_deform_attn(
            v,
            spatial_shapes,
            level_start_index,
            locations,
            weights,
            backend=self.backend,
            spatial_shapes_list=spatial_shapes_list,
        )
        out = self.output_proj(out)
        return out if self.batch_first else out.transpose(0, 1)

    def _check(
        self, query: Tensor, ref: Tensor, value: Tensor, key_padding_mask: Tensor | None
    ) -> None:
        c = self.embed_dim
        if query.dim() != 3 or query.shape[-1] != c:
            raise ValueError(f"query must be [B, Q, C={c}], got {tuple(query.shape)}")
        if value.dim() != 3 or value.shape[-1] != c or value.shape[0] != query.shape[0]:
            raise ValueError(
                f"value must be [B={query.shape[0]}, S, C={c}], got {tuple(value.shape)}"
            )
        b, q = query.shape[:2]
        ok_rank = ref.dim() == 3 or (ref.dim() == 4 and ref.shape[2] == self.num_levels)
        if not ok_rank or ref.shape[:2] != (b, q) or ref.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must be [B={b}, Q={q}, L={self.num_levels}, 2 or 4] or "
                f"[B, Q, 2 or 4], got {tuple(ref.shape)}"
            )
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be bool (True at padded positions), got "
                f"{key_padding_mask.dtype}; convert a 0/1 mask with mask.bool()"
            )
        if key_padding_mask is not None and key_padding_mask.shape != value.shape[:2]:
            raise ValueError(
                f"key_padding_mask must be [B, S]={tuple(value.shape[:2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
