"""``MaskHead``: one mask logit map per query from decoder hidden states and the encoder memory.

DETR's panoptic head, adapted to a multi-scale deformable encoder and to packed routes:

1. **attention maps** (DETR's ``MHAttentionMap`` idea): every query attends, per head, over the
   positions of one memory level (``attn_level``, by default the coarsest); the softmax over
   positions of each head gives ``M`` maps ``[H_a, W_a]`` per query;
2. **small conv FPN**: the level's memory (as a feature map, shared by every query of an image)
   concatenated with the query's ``M`` maps goes through two 3x3 conv + GroupNorm + ReLU blocks,
   then, for each finer memory level, is upsampled, added to a 1x1 adapter of that level and
   refined by one more block; a last 3x3 conv gives one logit per pixel. The output has the
   resolution of the finest memory level (level 0).

Routes stay packed: ``hidden`` is ``[R*B, Q, C]`` route-major (``(r b)``, image ``n % B``), the
memory is ``[B, S, C]`` and is projected once per image, never repeated per route or per query.
The first conv of ``cat(features, maps)`` is split into its feature and map parts (a conv is
linear in its input channels), so the per-image feature part is computed once and broadcast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskHead", "attention_maps"]


def attention_maps(query: Tensor, keys: Tensor, num_heads: int, mask: Tensor | None = None):
    """Per-head softmax attention of queries over a feature map.

    Args:
        query (Tensor[R, B, Q, D]): projected queries.
        keys (Tensor[B, D, H, W]): projected keys of the feature map.
        num_heads: ``M``; ``D`` is split into ``M`` heads of ``D / M`` channels.
        mask (Tensor[B, H, W], bool, optional): True at padded positions (weight 0).

    Returns:
        Tensor[R, B, Q, M, H, W]: each ``[H, W]`` map sums to 1 (over unpadded positions).
    """
    r, b, q, d = query.shape
    h, w = keys.shape[-2:]
    qh = query.reshape(r, b, q, num_heads, d // num_heads)  # [R, B, Q, M, D/M]
    kh = keys.reshape(b, num_heads, d // num_heads, h * w)  # [B, M, D/M, HW]
    logits = torch.einsum("rbqmd,bmds->rbqms", qh, kh) / math.sqrt(d / num_heads)
    if mask is not None:
        logits = logits.masked_fill(mask.reshape(1, b, 1, 1, h * w), float("-inf"))
    return logits.softmax(-1).reshape(r, b, q, num_heads, h, w)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU()
    )


class MaskHead(nn.Module):
    """Mask logits per query (DETR-style attention maps + small conv FPN), shared by all routes.

    Args:
        embed_dim: ``C``, channels of the hidden states and of the encoder memory.
        num_levels: ``L``, memory levels (the FPN walks from ``attn_level`` to level 0).
        num_heads: ``M``, attention maps per query.
        conv_dim: channels of the first conv block; block ``i`` of the FPN has
            ``max(conv_dim // 2**i, 8)`` channels.
        attn_level: memory level of the attention maps (negative counts from the end).

    ``forward(hidden, memory, spatial_shapes, level_start_index, key_padding_mask=None)``:

    - hidden (Tensor[N, Q, C]): last-layer hidden states of every route, packed route-major,
      ``N = R * B``;
    - memory (Tensor[B, S, C]): encoder output, levels concatenated (``S = sum H_l W_l``);
    - spatial_shapes (Tensor[L, 2], int64), level_start_index (Tensor[L], int64);
    - key_padding_mask (Tensor[B, S], bool, optional): True at padded positions.

    Returns ``Tensor[N, Q, H_0, W_0]``: mask logits at the finest level's resolution (normalised
    coordinates, so losses and post-processing resample them with ``grid_sample`` /
    ``interpolate`` to any image size).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_levels: int = 4,
        num_heads: int = 8,
        conv_dim: int = 128,
        attn_level: int = -1,
    ) -> None:
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("num_levels", num_levels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MaskHead: {name} must be an int >= 1, received {v!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"MaskHead: num_heads must divide embed_dim={embed_dim}, received {num_heads!r}"
            )
        if not isinstance(conv_dim, int) or conv_dim < 8:
            raise ValueError(f"MaskHead: conv_dim must be an int >= 8, received {conv_dim!r}")
        if not -num_levels <= attn_level < num_levels:
            raise ValueError(
                f"MaskHead: attn_level must be in [-{num_levels}, {num_levels}), "
                f"received {attn_level!r}"
            )
        self.embed_dim, self.num_levels, self.num_heads = embed_dim, num_levels, num_heads
        self.attn_level = attn_level % num_levels
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Conv2d(embed_dim, embed_dim, 1)
        steps = self.attn_level  # upsampling steps down to level 0
        dims = [max(conv_dim // 2**i, 8) for i in range(steps + 2)]
        self.feat_in = nn.Conv2d(embed_dim, dims[0], 3, padding=1)  # features part of conv 1
        self.maps_in = nn.Conv2d(num_heads, dims[0], 3, padding=1, bias=False)  # maps part
        self.norm_in = nn.GroupNorm(math.gcd(8, dims[0]), dims[0])
        self.block1 = _block(dims[0], dims[1])
        self.adapters = nn.ModuleList(nn.Conv2d(embed_dim, dims[i + 1], 1) for i in range(steps))
        self.blocks = nn.ModuleList(_block(dims[i + 1], dims[i + 2]) for i in range(steps))
        self.out = nn.Conv2d(dims[-1], 1, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform convs (``a=1``), zero biases (DETR's mask head); default linear."""
        self.q_proj.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                m.reset_parameters()

    def _level(self, memory: Tensor, shapes: Tensor, start: Tensor, lvl: int) -> Tensor:
        h, w = (int(x) for x in shapes[lvl])
        s = int(start[lvl])
        return memory[:, s : s + h * w].transpose(1, 2).reshape(memory.shape[0], -1, h, w)

    def forward(
        self,
        hidden: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """See the class docstring; returns ``Tensor[N, Q, H_0, W_0]``."""
        self._check(hidden, memory, spatial_shapes, level_start_index, key_padding_mask)
        b = memory.shape[0]
        n, q, c = hidden.shape
        r = n // b
        lvl = self.attn_level
        feat = self._level(memory, spatial_shapes, level_start_index, lvl)  # [B, C, H, W]
        h, w = feat.shape[-2:]
        pad = None
        if key_padding_mask is not None:
            s = int(level_start_index[lvl])
            pad = key_padding_mask[:, s : s + h * w].reshape(b, h, w)
        maps = attention_maps(
            self.q_proj(hidden).view(r, b, q, c), self.k_proj(feat), self.num_heads, pad
        )  # [R, B, Q, M, H, W]
        x = self.maps_in(maps.reshape(n * q, self.num_heads, h, w))  # [R*B*Q, D0, H, W]
        x = x.view(r, b, q, *x.shape[1:]) + self.feat_in(feat)[None, :, None]
        x = F.relu(self.norm_in(x.flatten(0, 2)))  # [R*B*Q, D0, H, W]
        x = self.block1(x)
        for i in range(lvl):
            fine = self._level(memory, spatial_shapes, level_start_index, lvl - 1 - i)
            side = self.adapters[i](fine)  # [B, D, H', W']
            x = F.interpolate(x, size=side.shape[-2:], mode="nearest")
            x = x.view(r, b, q, *x.shape[1:]) + side[None, :, None]
            x = self.blocks[i](x.flatten(0, 2))
        out = self.out(x)  # [R*B*Q, 1, H0, W0]
        return out.view(n, q, *out.shape[-2:])

    def _check(self, hidden, memory, shapes, start, kpm) -> None:
        c, lv = self.embed_dim, self.num_levels
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[-1] != c:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"MaskHead: hidden must be [R*B, Q, C={c}], received {got}")
        if not isinstance(memory, Tensor) or memory.dim() != 3 or memory.shape[-1] != c:
            got = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"MaskHead: memory must be [B, S, C={c}], received {got}")
        b = memory.shape[0]
        if b == 0 or hidden.shape[0] % b:
            raise ValueError(
                f"MaskHead: hidden's first dim must be R * B with B={b} (memory's batch), "
                f"received {hidden.shape[0]}"
            )
        if tuple(shapes.shape) != (lv, 2) or tuple(start.shape) != (lv,):
            raise ValueError(
                f"MaskHead: spatial_shapes must be [L={lv}, 2] and level_start_index [L={lv}], "
                f"received {tuple(shapes.shape)} and {tuple(start.shape)}"
            )
        total = int((shapes[:, 0] * shapes[:, 1]).sum())
        if memory.shape[1] != total:
            raise ValueError(
                f"MaskHead: memory has S={memory.shape[1]} positions, spatial_shapes sum to {total}"
            )
        if kpm is not None and (kpm.dtype != torch.bool or tuple(kpm.shape) != memory.shape[:2]):
            raise ValueError(
                f"MaskHead: key_padding_mask must be bool [B, S]={tuple(memory.shape[:2])}, "
                f"received {kpm.dtype} {tuple(kpm.shape)}"
            )
