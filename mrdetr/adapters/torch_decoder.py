"""Integration: ``torch.nn.TransformerDecoder`` (DETR style; post-norm and ``norm_first``).

What is wrapped, per ``nn.TransformerDecoderLayer``: ``self_attn`` (block-diagonal per route,
instruction tokens through its ``in_proj_weight``), ``norm1`` (the instruction route's own copy:
after self-attention when post-norm, before it with ``norm_first``) and the inline FFN's
``linear1``/``linear2`` (the FFN-owning route's own copies on its slice). ``multihead_attn``
(cross-attention) runs once over every route's queries; ``norm2``, ``norm3`` and the decoder's
final ``norm`` are shared. Both ``batch_first`` layouts are supported; inputs must be batched.

Tiled per route: ``tgt`` (and ``tgt_key_padding_mask``, ``memory_mask``); ``tgt_mask`` is the
mask of one route's queries and applies to each route. The primary route's output is returned
where the decoder returned it; :class:`~mrdetr.adapters.RouteOutputs` holds every route's
per-layer outputs with the decoder's ``norm`` applied (DETR's intermediate outputs; the spec's
``final_norm="auto"``).
"""

from __future__ import annotations

from torch import nn

from ..routing import tile
from .packing import MHACall
from .spec import DecoderSpec, SpecIntegration

__all__ = ["TorchDecoderIntegration"]


def _spec(batch_first: bool) -> DecoderSpec:
    qd = 1 if batch_first else 0
    return DecoderSpec(
        layers="layers", self_attn="self_attn", self_attn_norm="norm1",
        ffn=("linear1", "linear2"),
        query_inputs={"tgt": qd, "tgt_key_padding_mask": 1}, batch_first=batch_first,
    )  # fmt: skip


class TorchDecoderIntegration(SpecIntegration):
    """``nn.TransformerDecoder`` of ``nn.TransformerDecoderLayer`` (found inside a model too)."""

    name = "torch.nn.TransformerDecoder"

    def __init__(self) -> None:
        pass  # no fixed spec: it follows each decoder's batch_first

    def spec_for(self, decoder: nn.Module) -> DecoderSpec:
        return _spec(bool(decoder.layers[0].self_attn.batch_first))

    def find_decoder(self, model: nn.Module) -> nn.Module | None:
        found = [m for m in model.modules() if isinstance(m, nn.TransformerDecoder)]
        if len(found) > 1:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.TransformerDecoder)]
            raise ValueError(
                f"model holds {len(found)} nn.TransformerDecoder modules {names}: pass the one "
                "to wrap (or a DecoderSpec with decoder=<path>)"
            )
        if found:
            bad = [type(m).__name__ for m in found[0].layers
                   if not isinstance(m, nn.TransformerDecoderLayer)]  # fmt: skip
            if bad:
                raise ValueError(
                    f"nn.TransformerDecoder layers must be nn.TransformerDecoderLayer, got {bad}; "
                    "pass a DecoderSpec naming their sub-modules"
                )
        return found[0] if found else None

    def attention_call(self, host):
        return MHACall(bool(host.self_attn.batch_first))

    def tile_inputs(self, decoder, args, kwargs, num_routes):
        tgt = self._bind(decoder, args, kwargs).arguments["tgt"]
        if tgt.dim() != 3:
            raise ValueError(
                f"tgt: packed routes need batched [B, Q, C] / [Q, B, C] queries in train(), "
                f"got {tuple(tgt.shape)}"
            )
        rp = super().tile_inputs(decoder, args, kwargs, num_routes)
        bound = self._bind(decoder, rp.args, rp.kwargs)
        mask = bound.arguments.get("memory_mask")
        if mask is not None:  # [Q, S] or [B*H, Q, S]: one row per query
            bound.arguments["memory_mask"] = tile(mask, rp.layout, mask.dim() - 2)
        rp.args, rp.kwargs = bound.args[1:], bound.kwargs
        return rp
