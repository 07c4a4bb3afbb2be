"""HF transformers ``GroundingDinoDecoder`` and ``MMGroundingDinoDecoder`` (text-conditioned
Deformable DINO): one integration, parametrised by the class names.

What differs from Deformable-DETR:

- the self-attention (``GroundingDinoMultiheadAttention``) has ``query/key/value/out_proj``
  linears and is called ``(queries, keys, values, attention_mask)``
  (:class:`GroundingAttentionCall`);
- every layer cross-attends to the text (``encoder_attn_text``) with a mask the decoder expands
  to ``[B, H, config.num_queries, T]``: in a training pass the routes are folded into the batch
  for that call (``[R * B, Q, C]`` queries, the text features and mask tiled ``R`` times), so
  each route sees the same text as the primary;
- the layers' outputs pass the decoder's ``layer_norm`` before the heads;
- the class head is parameter-free (Grounding DINO) or one bias (MM): ``h @ text^T`` over the
  text tokens, ``-inf`` past the prompt, ``[B, Q, config.max_text_len]``: route predictions read
  the text features and token mask of the pass (``RouteOutputs.context``);
- the loss takes ``label_maps`` (phrase -> tokens, from ``input_ids``) and ``text_mask``: added to
  every route's predictions by :func:`~mrdetr.adapters.hf_route_predictions`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch
from torch import Tensor

from .deformable_detr import HFDeformableDetrIntegration

__all__ = ["GroundingAttentionCall", "HFGroundingDinoIntegration"]


class GroundingAttentionCall:
    """Call convention of ``GroundingDinoMultiheadAttention``: ``forward(queries, keys, values,
    attention_mask=None, output_attentions=False) -> (out,) or (out, probs)``, all ``[B, L, C]``;
    ``attention_mask`` is added to the logits."""

    def __init__(self, module) -> None:
        self.signature = inspect.signature(type(module).forward)

    def unpack(self, args, kwargs):
        """``(q, k, v [B, L, C], attn_mask or None, None)``."""
        a = self.signature.bind(None, *args, **kwargs).arguments
        return a["queries"], a["keys"], a["values"], a.get("attention_mask"), None

    def call(self, fn, q, k, v, attn_mask, key_padding_mask) -> Tensor:
        """The host's own forward on ``B'`` folded routes; ``[B', L, C]``."""
        return fn(queries=q, keys=k, values=v, attention_mask=attn_mask)[0]

    def pack(self, out: Tensor):
        return out, None


class _FoldedTextAttention:
    """``forward`` of ``encoder_attn_text`` in a packed pass: the ``R`` routes' queries
    (``[B, R * Q, C]``) folded into the batch, the text features and mask tiled to match."""

    def __init__(self, orig, num_routes: int) -> None:
        self.orig, self.num_routes = orig, num_routes

    def __call__(self, queries, keys, values, attention_mask=None, output_attentions=False):
        r = self.num_routes

        def tile(t):
            return None if t is None else t.repeat(r, *([1] * (t.dim() - 1)))

        folded = torch.cat(queries.chunk(r, 1), 0)  # [R * B, Q, C]
        out = self.orig(
            queries=folded, keys=tile(keys), values=tile(values),
            attention_mask=tile(attention_mask), output_attentions=output_attentions,
        )  # fmt: skip
        unfolded = [torch.cat(out[0].chunk(r, 0), 1)]  # [B, R * Q, C]
        if len(out) > 1:  # probabilities [R * B, H, Q, T] -> [B, H, R * Q, T]
            unfolded.append(torch.cat(out[1].chunk(r, 0), 2))
        return tuple(unfolded)


@contextlib.contextmanager
def _folded_text_attention(decoder, num_routes: int):
    modules = [layer.encoder_attn_text for layer in decoder.layers]
    for m in modules:
        if "forward" in m.__dict__:
            raise RuntimeError(f"{type(m).__name__} already has an instance forward")
        m.forward = _FoldedTextAttention(m.forward, num_routes)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


class HFGroundingDinoIntegration(HFDeformableDetrIntegration):
    """``GroundingDinoDecoder`` / ``MMGroundingDinoDecoder`` (see the module docstring).

    Args:
        prefix: the class-name prefix, ``"GroundingDino"`` or ``"MMGroundingDino"``.
    """

    def __init__(self, prefix: str = "GroundingDino") -> None:
        self.name = f"transformers {prefix}Decoder"
        self.decoder_class = f"{prefix}Decoder"
        self.detector_class = f"{prefix}ForObjectDetection"

    def attention_call(self, host) -> GroundingAttentionCall:
        return GroundingAttentionCall(host.self_attn)

    def layer_hidden(self, decoder, layer_output) -> Tensor:
        """The layer's hidden states after the decoder's ``layer_norm`` (as its heads see them)."""
        return decoder.layer_norm(super().layer_hidden(decoder, layer_output))

    def train_forward(self, decoder, state, forward, args, kwargs):
        with _folded_text_attention(decoder, len(state.plan)):
            return super().train_forward(decoder, state, forward, args, kwargs)

    def tile_inputs(self, decoder, args, kwargs, num_routes):
        rp = super().tile_inputs(decoder, args, kwargs, num_routes)
        a = inspect.signature(type(decoder).forward).bind(decoder, *args, **kwargs).arguments
        text, padding = a.get("text_encoder_hidden_states"), a.get("text_encoder_attention_mask")
        if text is None or padding is None:
            raise ValueError(
                f"{self.decoder_class}: a training pass needs text_encoder_hidden_states and "
                "text_encoder_attention_mask"
            )
        rp.inputs["context"] = {"text_hidden_states": text, "text_token_mask": ~padding.bool()}
        return rp

    def route_geometry(self, decoder, output, route_pass):
        """Deformable-DETR's per-layer references, and the text of the pass as context."""
        geometry = super().route_geometry(decoder, output, route_pass)
        return {**geometry, "context": route_pass.inputs["context"]}

    def route_heads(self, model, outputs, num_layers):
        """The detector's contrastive ``class_embed`` on the pass's text, its ``bbox_embed``."""
        text = outputs.context["text_hidden_states"]  # [B, T, C]
        mask = outputs.context["text_token_mask"]  # [B, T], True on prompt tokens

        def classes(head):
            return lambda h: head(
                vision_hidden_state=h, text_hidden_state=text, text_token_mask=mask
            )

        heads = [classes(h) for h in model.class_embed[:num_layers]]
        return heads, model.bbox_embed[:num_layers]

    def encoder_predictions(self, model_output):
        """The encoder proposals the loss supervises: ``encoder_logits``, ``encoder_pred_boxes``."""
        if getattr(model_output, "encoder_logits", None) is None:
            return None
        return {
            "pred_logits": model_output.encoder_logits,
            "pred_boxes": model_output.encoder_pred_boxes,
        }

    def loss_inputs(self, model, outputs, model_output, predictions):
        """``label_maps`` (from the output's ``input_ids``) and ``text_mask`` (the prompt tokens
        over ``[B, Q, max_text_len]``), built by transformers' own helpers."""
        if model_output is None:
            return {}  # predictions only: the loss inputs need the output's input_ids
        input_ids = getattr(model_output, "input_ids", None)
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(
                f"model_output: the {self.detector_class} loss of the routes needs its "
                f"input_ids (a ModelOutput: return_dict=True), got {type(model_output).__name__}"
            )
        modeling = sys.modules[type(model).__module__]
        logits = next(iter(predictions.values()))["pred_logits"]
        mask = outputs.context["text_token_mask"].long()
        return {
            "label_maps": modeling.build_label_maps(logits, input_ids),
            "text_mask": modeling.build_text_mask(logits, mask),
        }
