"""Unpacked oracle for the HF adapter tests: each route run as its own plain pass through a copy
of the unwrapped HF model with that route's modules swapped in; the instruction route's
attention written out with matmul + softmax through the host's own q/k/v/o projections.
Works on transformers 4.57 (``out_proj``, ``fc1``/``fc2`` on the layer) and 5.x (``o_proj``,
``mlp``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mrdetr import adapters


class InstructHFAttention(nn.Module):
    """HF DETR-family self-attention with instruction tokens in front of keys and values."""

    def __init__(self, host: nn.Module, tokens, tokens_pos, num_heads: int) -> None:
        super().__init__()
        self.host, self.num_heads = host, num_heads
        out = getattr(host, "o_proj", None)  # 5.x
        self.out = out if out is not None else host.out_proj  # 4.57
        self.tokens, self.tokens_pos = tokens.detach().clone(), tokens_pos.detach().clone()

    def forward(
        self, hidden_states, attention_mask=None, position_embeddings=None, object_queries=None,
        **kwargs,
    ):  # fmt: skip
        h = self.host
        if position_embeddings is None:  # 4.57 DETR, Table Transformer: ``object_queries``
            position_embeddings = object_queries
        b, q, c = hidden_states.shape
        heads = self.num_heads
        n = self.tokens.shape[0]
        qk = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        keys_in = torch.cat([(self.tokens + self.tokens_pos).expand(b, n, c), qk], 1)
        values_in = torch.cat([self.tokens.expand(b, n, c), hidden_states], 1)

        def heads_of(x):
            return x.view(b, x.shape[1], heads, c // heads).transpose(1, 2)  # [B, H, L, D]

        query = heads_of(h.q_proj(qk))
        key, value = heads_of(h.k_proj(keys_in)), heads_of(h.v_proj(values_in))
        logits = query @ key.transpose(-1, -2) * (c // heads) ** -0.5  # [B, H, Q, n+Q]
        if attention_mask is not None:
            logits = logits + torch.nn.functional.pad(attention_mask, (n, 0))
        out = (logits.softmax(-1) @ value).transpose(1, 2).reshape(b, q, c)
        return self.out(out), None


def owned_by_layer(wrapped: nn.Module, route_index: int):
    """Unwrap a copy of ``wrapped``: ``(copy, [(decoder layer, that route's OwnedModules or
    None)])`` for route ``route_index`` (all None for the primary route)."""
    model = copy.deepcopy(wrapped)
    decoder = next(m for m in model.modules() if "mrdetr_routes" in m._modules)
    state = decoder.mrdetr_routes
    route = state.routes[route_index]
    owned = [None if route_index == 0 else dict(a.items()).get(route.name) for a in state.aux]
    adapters.unwrap(model)
    return model, list(zip(decoder.layers, owned, strict=True))


def swap_owned(layers, norm: str, ffn: tuple[str, ...], attention) -> None:
    """Put one route's owned modules (``layers`` from :func:`owned_by_layer`) in place of the
    host's: its norm as ``layer.<norm>``, its FFN's modules as ``layer.<ffn[i]>``, and for an
    instruction route ``attention(layer.self_attn, own)`` as ``layer.self_attn``."""
    for layer, own in layers:
        if own is None:
            continue
        if hasattr(own, "self_attn_norm"):
            setattr(layer, norm, own.self_attn_norm)
        if hasattr(own, "ffn"):
            for name, module in zip(ffn, own.ffn, strict=True):
                setattr(layer, name, module)
        if hasattr(own, "tokens"):
            layer.self_attn = attention(layer.self_attn, own)


def route_copy(wrapped: nn.Module, route_index: int) -> nn.Module:
    """A plain (unwrapped) copy of ``wrapped`` running route ``route_index`` alone."""
    model, layers = owned_by_layer(wrapped, route_index)
    heads = model.config.decoder_attention_heads
    ffn = ("mlp",) if hasattr(layers[0][0], "mlp") else ("fc1", "fc2")  # 5.x / 4.57
    swap_owned(
        layers, "self_attn_layer_norm", ffn,
        lambda attn, own: InstructHFAttention(attn, own.tokens, own.tokens_pos, heads),
    )  # fmt: skip
    return model


def randomise(module: nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Perturb every parameter so that no two routes coincide (copies start equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def save_pretrained_kwargs(make, path) -> dict:
    """``save_pretrained`` arguments that work for a never-wrapped model from ``make()`` (saved
    to ``path``): transformers 4.57 cannot write a box-refining Deformable-DETR as safetensors
    (its box heads are shared between the detector and its decoder), wrapped or not, and needs
    ``safe_serialization=False``; 5.x writes it as safetensors (``{}``)."""
    try:
        make().save_pretrained(path)
    except RuntimeError as err:
        if "shared tensors" not in str(err):
            raise
        return {"safe_serialization": False}
    return {}
