"""Self-attention with separate content and position projections (Conditional-DETR, DAB-DETR).

These decoders do not project ``hidden + position`` with one q/k/v: they compute
``q = q_content(h) + q_pos(pos)``, ``k = k_content(h) + k_pos(pos)``, ``v = v(h)``. The
instruction route's tokens (``tokens``, their positional part ``tokens_pos``, both ``[n, C]``)
go through those same projections: the content projections take ``tokens``, the position
projections ``tokens_pos``, and the object queries attend to ``[tokens ; queries]``. Two call
conventions (see :class:`~mrdetr.adapters.packing.MHACall` for the protocol):

- :class:`ContentPositionCall`: the module owns the projections (Conditional-DETR, transformers
  5.x): ``forward(hidden_states, query_position_embeddings, attention_mask=None)``.
- :class:`ProjectedAttentionCall`: the projections live outside the attention module, which
  takes projected ``q, k, v`` (Conditional-DETR 4.57: on the layer; DAB-DETR: on the
  self-attention wrapper): ``forward(hidden_states=q, attention_mask=None, key_states=k,
  value_states=v)``.

:class:`HFContentPositionIntegration` is what both families share on top of
:class:`~mrdetr.adapters.hf.HFDecoderIntegration`: the final ``decoder.layernorm`` in the
per-layer hidden states, the last layer taken from the decoder's own ``last_hidden_state``, and
outputs whose reference points lie on another axis than dim 1.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..hf_compat import layer_hidden
from .base import HFDecoderIntegration

__all__ = ["ContentPositionCall", "HFContentPositionIntegration", "ProjectedAttentionCall"]


def _no_mask(attn_mask, key_padding_mask, family: str) -> None:
    if attn_mask is not None or key_padding_mask is not None:
        raise ValueError(
            f"{family}: instruction tokens need a self-attention without masks (the decoder "
            f"passes none), got attn_mask={attn_mask is not None}, "
            f"key_padding_mask={key_padding_mask is not None}"
        )


class ContentPositionCall:
    """``forward(hidden_states [B, L, C], query_position_embeddings [B, L, C],
    attention_mask=None) -> (out, weights)`` of a module holding ``q_content_proj``,
    ``q_pos_proj``, ``k_content_proj``, ``k_pos_proj``, ``v_proj``. ``unpack`` returns
    ``(hidden, position, hidden)`` as ``(q, k, v)``: the routes are split along the query axis
    and the module itself projects them."""

    def __init__(self, module: nn.Module) -> None:
        self.signature = inspect.signature(type(module).forward)

    def unpack(self, args, kwargs):
        """``(hidden, position, hidden [B, L, C], attention_mask, None)``."""
        a = self.signature.bind(None, *args, **kwargs).arguments
        hidden = a["hidden_states"]
        return hidden, a["query_position_embeddings"], hidden, a.get("attention_mask"), None

    def call(self, fn, q, k, v, attn_mask, key_padding_mask) -> Tensor:
        """``fn`` on ``B'`` folded routes (``q``: hidden, ``k``: position); ``[B', L, C]``."""
        return fn(hidden_states=q, query_position_embeddings=k, attention_mask=attn_mask)[0]

    def pack(self, out: Tensor):
        return out, None

    def attend_with_tokens(self, fn, q, k, v, tokens, tokens_pos, attn_mask, key_padding_mask):
        """Tokens in front of the hidden states and ``tokens_pos`` in front of the positions,
        through ``fn`` (the module's own projections and attention); the token rows of its
        output are dropped. ``[B, Q, C]``."""
        _no_mask(attn_mask, key_padding_mask, "Conditional-DETR")
        b, n = q.shape[0], tokens.shape[0]
        hidden = torch.cat([tokens.expand(b, -1, -1), q], 1)  # [B, n+Q, C]
        pos = torch.cat([tokens_pos.expand(b, -1, -1), k], 1)
        return fn(hidden_states=hidden, query_position_embeddings=pos)[0][:, n:]


class ProjectedAttentionCall:
    """``forward(hidden_states=q, attention_mask=None, key_states=k, value_states=v) ->
    (out, weights)``, ``[B, L, C]`` projected inputs. ``key_content``, ``key_pos``, ``value``:
    the host's own projections (outside ``module``) that project the instruction tokens."""

    def __init__(
        self, module: nn.Module, key_content: nn.Module, key_pos: nn.Module, value: nn.Module
    ) -> None:
        self.signature = inspect.signature(type(module).forward)
        self.key_content, self.key_pos, self.value = key_content, key_pos, value

    def unpack(self, args, kwargs):
        """``(q, k, v [B, L, C], attention_mask, None)``."""
        a = self.signature.bind(None, *args, **kwargs).arguments
        return a["hidden_states"], a["key_states"], a["value_states"], a.get("attention_mask"), None

    def call(self, fn, q, k, v, attn_mask, key_padding_mask) -> Tensor:
        """``fn`` on ``B'`` folded routes; ``[B', L, C]``."""
        return fn(hidden_states=q, attention_mask=attn_mask, key_states=k, value_states=v)[0]

    def pack(self, out: Tensor):
        return out, None

    def attend_with_tokens(self, fn, q, k, v, tokens, tokens_pos, attn_mask, key_padding_mask):
        """Keys ``[key_content(tokens) + key_pos(tokens_pos) ; k]``, values
        ``[value(tokens) ; v]``, through ``fn`` (the host's attention); ``[B, Q, C]``."""
        _no_mask(attn_mask, key_padding_mask, "content/position self-attention")
        b = q.shape[0]
        tk = self.key_content(tokens) + self.key_pos(tokens_pos)  # [n, C]
        tv = self.value(tokens)  # [n, C]
        keys = torch.cat([tk.expand(b, -1, -1), k], 1)  # [B, n+Q, C]
        values = torch.cat([tv.expand(b, -1, -1), v], 1)
        return fn(hidden_states=q, key_states=keys, value_states=values)[0]


class HFContentPositionIntegration(HFDecoderIntegration):
    """What Conditional- and DAB-DETR share (subclass per family; each names the query axis
    of its ``reference_points`` output in ``output_query_dims``)."""

    def layer_hidden(self, decoder, layer_output) -> Tensor:
        """The layer's output through the decoder's final ``layernorm`` (its intermediates)."""
        return decoder.layernorm(layer_hidden(layer_output))

    def train_forward(self, decoder, state, forward, args, kwargs):
        """As the base, with the last layer's hidden states the decoder's own
        ``last_hidden_state`` per route (Conditional-DETR norms it twice with
        ``auxiliary_loss``: what its heads see)."""
        primary, outputs = super().train_forward(decoder, state, forward, args, kwargs)
        routes = [primary, *(outputs.outputs[r.name] for r in state.routes[1:])]
        last = torch.stack([r[0] for r in routes])  # [R, B, Q, C]
        outputs.hidden_states = torch.cat([outputs.hidden_states[:-1], last[None]])
        return primary, outputs
