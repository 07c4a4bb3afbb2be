"""The original DETR codebase's decoder and prediction heads, re-implemented for tests and docs.

Written here from the documented behaviour of facebookresearch/detr ``models/transformer.py``
and ``models/detr.py`` (not copied): sequence-first tensors ``[Q, B, C]``;
``TransformerDecoderLayer`` with ``self_attn`` and ``multihead_attn`` (``nn.MultiheadAttention``),
``linear1``/``linear2``, ``norm1``-``norm3``, ``dropout``/``dropout1``-``dropout3``, post-norm by
default and pre-norm with ``normalize_before``; ``TransformerDecoder.forward(tgt, memory,
tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, pos, query_pos)``
normalising every layer's output with ``norm`` and returning them stacked ``[N, Q, B, C]`` with
``return_intermediate`` (else the last one, ``[1, Q, B, C]``).

:class:`DetrDecoderModel` is DETR's detector past the encoder: learned query embeddings, the
decoder (``model.transformer.decoder``), ``class_embed`` (``K + 1`` logits, the last no-object)
and the 3-layer ``bbox_embed`` MLP, on a memory given as input.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DetrDecoderModel", "TransformerDecoder", "TransformerDecoderLayer"]


def _plus(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class TransformerDecoderLayer(nn.Module):
    """One DETR decoder layer: self-attention, cross-attention, FFN; each with residual + norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.normalize_before = normalize_before

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None) -> Tensor:  # fmt: skip
        """``tgt [Q, B, C]``, ``memory [S, B, C]`` -> ``[Q, B, C]``."""
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = k = _plus(x, query_pos)
        a = self.self_attn(q, k, value=x, attn_mask=tgt_mask,
                           key_padding_mask=tgt_key_padding_mask)[0]  # fmt: skip
        tgt = tgt + self.dropout1(a)
        tgt = tgt if pre else self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        a = self.multihead_attn(query=_plus(x, query_pos), key=_plus(memory, pos), value=memory,
                                attn_mask=memory_mask,
                                key_padding_mask=memory_key_padding_mask)[0]  # fmt: skip
        tgt = tgt + self.dropout2(a)
        tgt = tgt if pre else self.norm2(tgt)
        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self._ffn(x))
        return tgt if pre else self.norm3(tgt)


class TransformerDecoder(nn.Module):
    """``num_layers`` clones of ``decoder_layer`` and the final ``norm``."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 return_intermediate: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None) -> Tensor:  # fmt: skip
        """``[N, Q, B, C]`` every layer's normalised output (``[1, Q, B, C]``: the last only,
        without ``return_intermediate``)."""
        output, intermediate = tgt, []
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, pos=pos,
                           query_pos=query_pos)  # fmt: skip
            if self.return_intermediate:
                intermediate.append(self.norm(output))
        if self.norm is not None:
            output = self.norm(output)
            if self.return_intermediate:
                intermediate[-1] = output
        return torch.stack(intermediate) if self.return_intermediate else output.unsqueeze(0)


class _MLP(nn.Module):
    """DETR's box head: ``num_layers`` linears with ReLU between them."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (num_layers - 1)
        outs = dims[1:] + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, outs, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DetrDecoderModel(nn.Module):
    """DETR from the encoder's memory on: queries, decoder, heads (``aux_loss`` outputs).

    Args:
        num_classes: ``K``; ``class_embed`` predicts ``K + 1`` (the last: no object).
        d_model, nhead, num_layers, dim_feedforward, dropout, normalize_before,
        return_intermediate: the decoder's (``return_intermediate=False`` as DETR without
            ``aux_loss``).
        num_queries: ``Q``.
    """

    def __init__(self, num_classes: int = 5, d_model: int = 32, nhead: int = 4,
                 num_layers: int = 3, dim_feedforward: int = 64, dropout: float = 0.1,
                 num_queries: int = 10, normalize_before: bool = False,
                 return_intermediate: bool = True) -> None:  # fmt: skip
        super().__init__()
        layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.transformer = nn.Module()
        self.transformer.decoder = TransformerDecoder(
            layer, num_layers, nn.LayerNorm(d_model), return_intermediate
        )
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = _MLP(d_model, d_model, 4, 3)

    def forward(self, memory: Tensor, pos: Tensor, mask: Tensor | None = None) -> dict:
        """``memory``, ``pos``: ``[S, B, C]`` (flattened encoder output and its positions);
        ``mask``: ``[B, S]`` padding. Returns DETR's ``{"pred_logits": [B, Q, K + 1],
        "pred_boxes": [B, Q, 4] (cx, cy, w, h in [0, 1]), "aux_outputs": [...]}``."""
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, memory.shape[1], 1)
        hs = self.transformer.decoder(torch.zeros_like(query_pos), memory,
                                      memory_key_padding_mask=mask, pos=pos,
                                      query_pos=query_pos).transpose(1, 2)  # fmt: skip
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        layers = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits, boxes, strict=True)]
        return {**layers[-1], "aux_outputs": layers[:-1]}
