"""HF transformers ``OmDetTurboDecoder`` (inside ``OmDetTurboForObjectDetection``): task tokens
concatenated to the queries inside self-attention; no training loss in transformers.

What differs from the other HF families:

- the decoder builds its queries itself (``_get_decoder_input``: top-k encoder proposals), so a
  training pass tiles them there (``[B, R * Q, C]`` embeddings, ``[B, R * Q, 4]`` references);
- every layer's self-attention runs on ``[queries ; task tokens]`` and hands the updated task
  tokens to the next layer: each route keeps its own task tokens (``R * T`` of them, route-major,
  behind the ``R * Q`` queries), and the self-attention and its norm (``norm1``) see, per route,
  ``[that route's Q queries ; its T task tokens]`` with the decoder's ``[Q + T, Q + T]`` fusion
  mask (routes folded into the batch; the instruction route through the host's
  ``query/key/value/out_proj`` with its tokens in front of the keys, the task tokens' padding as
  key padding);
- the FFN is ``linear1``/``linear2``;
- ``forward(labels=...)`` raises ``NotImplementedError`` in transformers: the routes are for the
  user's own loss, in :func:`~mrdetr.adapters.route_outputs` (``outputs[route]`` holds the
  route's ``decoder_classes [N, B, Q, K]`` and ``decoder_coords [N, B, Q, 4]``; ``boxes`` and
  ``hidden_states`` hold every route; ``context["class_features"]`` the class embeddings).
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch
from torch import Tensor

from ...routing import RouteLayout, attention_weights, instructive_attend, split, tile
from ..hf_compat import request_model_output
from ..integration import RouteOutputs, RoutePass
from ..packing import _RoutedForward
from ..route_modules import LayerModules
from .base import HFDecoderIntegration
from .grounding_dino import GroundingAttentionCall

__all__ = ["HFOmDetTurboIntegration"]

_LAYER_STACKED = ("decoder_coords", "decoder_classes")  # [N, B, L, ...]


def _per_route(x: Tensor, layout: RouteLayout) -> list[Tensor]:
    """``[B, R*Q + R*T, C]`` -> per route ``[B, Q + T, C]`` (its queries, then its task tokens)."""
    r, n = layout.num_routes, layout.length
    tasks = x[:, n:].chunk(r, 1)
    return [torch.cat([o, t], 1) for o, t in zip(split(x[:, :n], layout, 1), tasks, strict=True)]


def _join(parts: list[Tensor], q: int) -> Tensor:
    """Inverse of :func:`_per_route`."""
    return torch.cat([p[:, :q] for p in parts] + [p[:, q:] for p in parts], 1)


class _TaskSelfAttention:
    """``self_attn`` forward in a packed pass: per route ``[queries ; task tokens]``."""

    def __init__(self, state, rp, layer: int, module, orig) -> None:
        self.state, self.rp, self.layer, self.module, self.orig = state, rp, layer, module, orig

    def __call__(self, queries, keys, values, attention_mask=None, output_attentions=False):
        layout, plan = self.rp.layout, self.state.plan
        qs, ks, vs = (_per_route(t, layout) for t in (queries, keys, values))
        outs: list[Tensor | None] = [None] * layout.num_routes
        for g in plan.packs("self_attn", layout.num_routes):
            if g.owner is None:
                idx, n = g.routes, len(g.routes)
                mask = None if attention_mask is None else attention_mask.repeat(n, 1, 1, 1)
                fold = [torch.cat([t[i] for i in idx], 0) for t in (qs, ks, vs)]
                y = self.orig(fold[0], fold[1], fold[2], attention_mask=mask)[0]
                for i, part in zip(idx, y.chunk(n), strict=True):
                    outs[i] = part
                continue
            i, own = g.routes[0], self.state.aux[self.layer][g.owner]
            attn = getattr(own, "self_attn", None)
            if hasattr(own, "tokens"):
                host = self.module if attn is None else attn
                w = attention_weights(host)
                pad = None if attention_mask is None else attention_mask[:, 0, 0, :]
                if pad is not None and pad.dtype == torch.bool:
                    pad = ~pad  # a boolean mask keeps True
                outs[i] = instructive_attend(
                    qs[i], ks[i], vs[i], w, own.tokens + own.tokens_pos, own.tokens,
                    key_padding_mask=pad, dropout_p=w.dropout if host.training else 0.0,
                )[0]  # fmt: skip
            else:
                outs[i] = attn(qs[i], ks[i], vs[i], attention_mask=attention_mask)[0]
        out = _join(outs, layout.num_queries)
        return (out, None) if output_attentions else (out,)


class _TaskNorm:
    """``norm1`` forward in a packed pass: each route's ``[queries ; task tokens]`` through the
    host norm or its owner's copy."""

    def __init__(self, state, rp, layer: int, orig) -> None:
        self.state, self.rp, self.layer, self.orig = state, rp, layer, orig

    def __call__(self, x: Tensor) -> Tensor:
        layout = self.rp.layout
        parts = _per_route(x, layout)
        owned = self.state.aux[self.layer]
        for g in self.state.plan.packs("self_attn_norm", layout.num_routes):
            fn = self.orig if g.owner is None else owned[g.owner].self_attn_norm
            for i in g.routes:
                parts[i] = fn(parts[i])
        return _join(parts, layout.num_queries)


@contextlib.contextmanager
def _packed(decoder, state, rp: RoutePass):
    layout, plan = rp.layout, state.plan
    rp.hidden = [[] for _ in state.host_layers]
    orig_input = decoder._get_decoder_input

    def decoder_input(*args, **kwargs):
        embeddings, refs, *rest = orig_input(*args, **kwargs)
        return (tile(embeddings, layout, 1), tile(refs, layout, 1), *rest)

    def task_tokens(_module, args, kwargs):  # [T, B, C] -> one copy per route [R*T, B, C]
        return (args[0], args[1].repeat(layout.num_routes, 1, 1), *args[2:]), kwargs

    installed, hooks = [decoder], []
    decoder._get_decoder_input = decoder_input
    try:
        hooks.append(decoder.layers[0].register_forward_pre_hook(task_tokens, with_kwargs=True))
        for li, host in enumerate(state.host_layers):
            host.self_attn.forward = _TaskSelfAttention(
                state, rp, li, host.self_attn, host.self_attn.forward
            )
            installed.append(host.self_attn)
            if plan.owners("self_attn_norm"):
                host.self_attn_norm.forward = _TaskNorm(state, rp, li, host.self_attn_norm.forward)
                installed.append(host.self_attn_norm)
            if plan.owners("ffn"):
                for j, m in enumerate(host.ffn):
                    m.forward = _RoutedForward(state, rp, li, "ffn", j, m.forward)
                    installed.append(m)
            hooks.append(host.layer.register_forward_hook(
                lambda _m, _i, out, li=li: rp.hidden[li].append(out)))  # fmt: skip
        yield
    finally:
        for h in hooks:
            h.remove()
        del decoder._get_decoder_input
        for m in installed[1:]:
            del m.forward


def _slice(output, layout: RouteLayout, i: int, as_tuple: bool):
    def take(t, dim):
        if not isinstance(t, Tensor) or t.dim() <= dim or t.shape[dim] != layout.length:
            return t
        return split(t, layout, dim)[i]

    fields = {}
    for name in type(output).__dataclass_fields__:
        value, dim = getattr(output, name), 2 if name in _LAYER_STACKED else 1
        fields[name] = tuple(take(t, 1) for t in value) if name == "hidden_states" and value else (
            take(value, dim)
        )  # fmt: skip
    part = type(output)(**fields)
    return tuple(fields.values()) if as_tuple else part  # the decoder's tuple keeps its Nones


class HFOmDetTurboIntegration(HFDecoderIntegration):
    """``OmDetTurboDecoder`` (see the module docstring)."""

    name = "transformers OmDetTurboDecoder"
    decoder_class = "OmDetTurboDecoder"
    detector_class = "OmDetTurboForObjectDetection"

    def layer_modules(self, decoder) -> list[LayerModules]:
        return [
            LayerModules(layer, layer.self_attn, layer.norm1, (layer.linear1, layer.linear2))
            for layer in decoder.layers
        ]

    def attention_call(self, host) -> GroundingAttentionCall:
        return GroundingAttentionCall(host.self_attn)

    def train_forward(self, decoder, state, forward, args, kwargs):
        bound = inspect.signature(type(decoder).forward).bind(decoder, *args, **kwargs)
        as_tuple = request_model_output(decoder, bound.arguments)
        layout = RouteLayout(len(state.plan), decoder.num_queries)
        rp = RoutePass(layout, bound.args[1:], bound.kwargs, {"as_tuple": as_tuple})
        with _packed(decoder, state, rp):
            output = forward(*rp.args, **rp.kwargs)
        hidden = torch.stack([torch.stack(split(h[-1][0], layout, 1)) for h in rp.hidden])
        output.decoder_classes = self._route_classes(decoder, hidden, bound.arguments)
        names = [r.name for r in state.routes]
        aux = {n: _slice(output, layout, i, as_tuple) for i, n in enumerate(names) if i}
        boxes = torch.stack(split(output.decoder_coords, layout, 2), 1)  # [N, R, B, Q, 4]
        context = {"class_features": bound.arguments["class_features"]}
        outputs = RouteOutputs(state.routes, hidden, aux, boxes=boxes, context=context)
        return _slice(output, layout, 0, as_tuple), outputs

    def _route_classes(self, decoder, hidden: Tensor, arguments) -> Tensor:
        """``decoder_classes [N, B, R * Q, K]`` computed route by route, exactly as the decoder
        computes them for its ``Q`` queries (one similarity over ``R * Q`` queries rounds
        differently)."""
        similarity = sys.modules[type(decoder).__module__].get_class_similarity
        features = arguments["class_features"]
        per_layer = []
        for i, h in enumerate(hidden):  # [R, B, Q, C]
            proj = decoder.decoder_class_head[i](features).permute(1, 2, 0)
            routes = [similarity(decoder.class_distance_type, hr, proj) for hr in h]
            per_layer.append(torch.cat(routes, 1))
        return torch.stack(per_layer)
