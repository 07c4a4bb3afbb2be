"""A stand-in for the public Deformable-DETR repository's decoder, for the adapter tests.

Written here from the published interface only (attribute names, forward signature, return
convention and sub-layer order), with mrdetr's ``MultiScaleDeformableAttention`` as the
cross-attention, so that wrapping and converting code written against the original decoder can
be tested without that repository:

- ``DeformableTransformerDecoderLayer``: ``self_attn`` (``nn.MultiheadAttention``, sequence
  first), ``dropout2``/``norm2`` after it; ``cross_attn``, ``dropout1``/``norm1`` after it;
  ``linear1``, ``dropout3``, ``linear2``, ``dropout4``, ``norm3`` (FFN). Post-norm.
  ``forward(tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index,
  src_padding_mask=None)``.
- ``DeformableTransformerDecoder``: ``layers``, ``num_layers``, ``return_intermediate``,
  ``bbox_embed``/``class_embed`` (None unless the detector sets them), ``forward(tgt,
  reference_points, src, src_spatial_shapes, src_level_start_index, src_valid_ratios,
  query_pos=None, src_padding_mask=None)`` returning ``(stack(outputs), stack(references))``
  with ``return_intermediate``, where entry ``i`` of the references is what layer ``i``
  produced (detached; the input reference when there is no box refinement).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrdetr import MultiScaleDeformableAttention
from mrdetr.layers import inverse_sigmoid


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(
        self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8,
        n_points=4, backend="pytorch",
    ):  # fmt: skip
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(
            d_model, n_heads, n_levels, n_points, backend=backend
        )
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = {"relu": F.relu, "gelu": F.gelu}[activation]
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self, tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index,
        src_padding_mask=None,
    ):  # fmt: skip
        qk = tgt if query_pos is None else tgt + query_pos
        seq_first = (qk.transpose(0, 1), qk.transpose(0, 1), tgt.transpose(0, 1))
        attended = self.self_attn(*seq_first)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attended))
        query = tgt if query_pos is None else tgt + query_pos
        sampled = self.cross_attn(
            query, reference_points, src, src_spatial_shapes, level_start_index, src_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(sampled))
        hidden = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(hidden))


class DeformableTransformerDecoder(nn.Module):
    def __init__(self, decoder_layer, num_layers, return_intermediate=False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.bbox_embed = None
        self.class_embed = None

    def forward(
        self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index,
        src_valid_ratios, query_pos=None, src_padding_mask=None,
    ):  # fmt: skip
        output = tgt
        outputs, references = [], []
        for i, layer in enumerate(self.layers):
            ratios = src_valid_ratios
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([src_valid_ratios, src_valid_ratios], -1)
            per_level = reference_points[:, :, None] * ratios[:, None]  # [B, Q, L, 2|4]
            output = layer(
                output, query_pos, per_level, src, src_spatial_shapes, src_level_start_index,
                src_padding_mask,
            )  # fmt: skip
            if self.bbox_embed is not None:
                delta = self.bbox_embed[i](output)
                if reference_points.shape[-1] == 4:
                    refined = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:  # 2-d points become boxes: the centre is refined, the size predicted
                    centre = delta[..., :2] + inverse_sigmoid(reference_points)
                    refined = torch.cat([centre, delta[..., 2:]], -1).sigmoid()
                reference_points = refined.detach()
            if self.return_intermediate:
                outputs.append(output)
                references.append(reference_points)
        if self.return_intermediate:
            return torch.stack(outputs), torch.stack(references)
        return output, reference_points


def box_head(dim: int) -> nn.Module:
    """A 3-layer MLP box head ``[..., C] -> [..., 4]`` (Deformable-DETR's ``bbox_embed``)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                         nn.Linear(dim, 4))  # fmt: skip


def make_decoder(
    *, dim=32, heads=4, levels=2, points=2, ffn=64, num_layers=2, box_refine=False, seed=0
) -> DeformableTransformerDecoder:
    """A small decoder (dropout 0) with distinct random weights per layer and trained-looking
    (non-identity) LayerNorms; ``box_refine`` sets ``bbox_embed`` like the original detector."""
    torch.manual_seed(seed)
    layer = DeformableTransformerDecoderLayer(dim, ffn, 0.0, "relu", levels, heads, points)
    decoder = DeformableTransformerDecoder(layer, num_layers, return_intermediate=True)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    if box_refine:
        decoder.bbox_embed = nn.ModuleList(box_head(dim) for _ in range(num_layers))
    return decoder


def make_inputs(*, batch=2, queries=7, dim=32, levels=((8, 8), (4, 4)), boxes=False, seed=1):
    """``(tgt, reference_points, src, shapes, starts, valid_ratios, query_pos)`` for the
    decoder; reference points ``[B, Q, 2]`` (or boxes ``[B, Q, 4]``)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    src = torch.randn(batch, int(shapes.prod(1).sum()), dim, generator=g)
    tgt = torch.randn(batch, queries, dim, generator=g)
    pos = torch.randn(batch, queries, dim, generator=g)
    ref = 0.2 + 0.6 * torch.rand(batch, queries, 4 if boxes else 2, generator=g)
    ratios = 0.8 + 0.2 * torch.rand(batch, len(levels), 2, generator=g)
    return tgt, ref, src, shapes, starts, ratios, pos


def expected_outputs(decoder, inputs) -> tuple[Tensor, Tensor]:
    """The decoder's own forward (the oracle)."""
    tgt, ref, src, shapes, starts, ratios, pos = inputs
    return decoder(tgt, ref, src, shapes, starts, ratios, pos)
