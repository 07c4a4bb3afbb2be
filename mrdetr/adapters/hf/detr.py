"""HF transformers ``DetrDecoder`` (``DetrForObjectDetection``) and ``TableTransformerDecoder``
(``TableTransformerForObjectDetection``): plain q/k/v self-attention, no reference points, no
denoising, a final ``decoder.layernorm``, softmax classification over ``K + 1`` classes.

Two call conventions, recognised from the installed classes:

- DETR in transformers 5.x: ``self_attn(hidden_states, attention_mask, position_embeddings)``
  (:class:`~.base.HFSelfAttentionCall`), decoder argument ``object_queries_position_embeddings``;
- DETR in 4.57 and Table Transformer in both: ``self_attn(hidden_states, attention_mask,
  object_queries, ...)`` (:class:`ObjectQueriesCall`), decoder argument
  ``query_position_embeddings`` (its ``object_queries`` argument is the image's spatial
  embedding, not tiled).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ...routing import tile
from ..hf_compat import layer_hidden
from ..integration import RoutePass
from .base import HFDecoderIntegration, HFSelfAttentionCall

__all__ = ["HFDetrIntegration", "ObjectQueriesCall"]

_QUERY_POSITION = "query_position_embeddings"  # 4.57 DETR, Table Transformer: tiled per route


class ObjectQueriesCall(HFSelfAttentionCall):
    """``DetrAttention`` (4.57) / ``TableTransformerAttention`` as self-attention:
    ``forward(hidden_states, attention_mask=None, object_queries=None, ...) -> (out, weights)``
    with ``q = k = hidden_states + object_queries`` and ``v = hidden_states`` (``[B, L, C]``)."""

    def unpack(self, args, kwargs):
        """``(q, k, v [B, L, C], attn_mask or None, None)``."""
        a = self.signature.bind(None, *args, **kwargs).arguments
        hidden, pos = a["hidden_states"], a.get("object_queries")
        qk = hidden if pos is None else hidden + pos
        return qk, qk, hidden, a.get("attention_mask"), None

    def call(self, fn, q, k, v, attn_mask, key_padding_mask) -> Tensor:
        """The host's own forward on ``B'`` folded routes; ``[B', L, C]``."""
        return fn(hidden_states=v, attention_mask=attn_mask, object_queries=q - v)[0]


def _last_hidden(output) -> Tensor:
    """``last_hidden_state`` ``[B, Q, C]`` of a decoder output (a ``ModelOutput`` or its tuple)."""
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


class HFDetrIntegration(HFDecoderIntegration):
    """DETR-style decoder (``decoder_class`` inside ``detector_class``).

    Route hidden states are the host's predictions' inputs: every layer's output through
    ``decoder.layernorm`` (the ``intermediate_hidden_states``), the last layer replaced by the
    decoder's own ``last_hidden_state`` (in transformers 5.x with ``config.auxiliary_loss`` the
    decoder norms inside its loop, so its last output is normed twice: the detector's logits are
    computed from that, and so are the routes').

    Args:
        decoder_class: ``"DetrDecoder"`` or ``"TableTransformerDecoder"``.
        detector_class: ``"DetrForObjectDetection"`` or ``"TableTransformerForObjectDetection"``.
    """

    query_inputs = ("inputs_embeds",)

    def __init__(self, decoder_class: str, detector_class: str) -> None:
        self.decoder_class, self.detector_class = decoder_class, detector_class
        self.name = f"transformers {decoder_class}"

    def attention_call(self, host):
        params = inspect.signature(type(host.self_attn).forward).parameters
        if "object_queries" in params:
            return ObjectQueriesCall(host.self_attn)
        return HFSelfAttentionCall(host.self_attn)

    def layer_hidden(self, decoder, layer_output) -> Tensor:
        """A layer's output through the decoder's final ``layernorm`` (``[B, L, C]``)."""
        return decoder.layernorm(layer_hidden(layer_output))

    def tile_inputs(self, decoder, args, kwargs, num_routes) -> RoutePass:
        """As the base, plus the 4.57 / Table Transformer query positions
        (``query_position_embeddings``); a per-query ``attention_mask`` is refused."""
        sig = inspect.signature(type(decoder).forward)
        if sig.bind(decoder, *args, **kwargs).arguments.get("attention_mask") is not None:
            raise ValueError(
                f"{self.decoder_class}: training routes take no decoder attention_mask (a "
                "per-query padding mask, decoder_attention_mask of the model); got one"
            )
        rp = super().tile_inputs(decoder, args, kwargs, num_routes)
        bound = sig.bind(decoder, *rp.args, **rp.kwargs)
        pos = bound.arguments.get(_QUERY_POSITION)
        if _QUERY_POSITION in sig.parameters and pos is not None:
            rp.inputs[_QUERY_POSITION] = pos
            bound.arguments[_QUERY_POSITION] = tile(pos, rp.layout, 1)
            rp.args, rp.kwargs = bound.args[1:], bound.kwargs
        return rp

    def train_forward(self, decoder, state, forward, args, kwargs):
        primary, outputs = super().train_forward(decoder, state, forward, args, kwargs)
        finals = [_last_hidden(primary), *(_last_hidden(o) for o in outputs.outputs.values())]
        last = torch.stack(finals)[None]  # [1, R, B, Q, C]
        outputs.hidden_states = torch.cat([outputs.hidden_states[:-1], last])
        return primary, outputs

    def prediction_heads(self, model, num_layers):
        """``class_labels_classifier`` (``K + 1`` logits, the last no-object) and
        ``bbox_predictor`` (sigmoid applied by ``route_predictions``), shared by the layers."""
        return model.class_labels_classifier, model.bbox_predictor
