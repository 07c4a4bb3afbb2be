"""Unpacked oracle for adapter tests: each route run as its own pass through a copy of the host
with that route's modules swapped in, the instruction route's attention by torch's own
``nn.MultiheadAttention`` over ``[tokens ; keys]``."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mrdetr import adapters


class InstructMHA(nn.Module):
    """``mha`` with instruction tokens prepended to its keys and values (torch's own kernel)."""

    def __init__(self, mha: nn.MultiheadAttention, tokens, tokens_pos) -> None:
        super().__init__()
        self.mha = mha
        self.tokens, self.tokens_pos = tokens.detach().clone(), tokens_pos.detach().clone()

    @property
    def batch_first(self):
        return self.mha.batch_first

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False,
                attn_mask=None, is_causal=False):  # fmt: skip
        bf = self.mha.batch_first
        q, k, v = (t if bf else t.transpose(0, 1) for t in (query, key, value))
        b, n = q.shape[0], self.tokens.shape[0]
        k = torch.cat([(self.tokens + self.tokens_pos).expand(b, n, -1), k], 1)
        v = torch.cat([self.tokens.expand(b, n, -1), v], 1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (n, 0), value=0)  # instruction keys: visible
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (n, 0), value=False)
        k, v = (t if bf else t.transpose(0, 1) for t in (k, v))
        return self.mha(query, k, v, key_padding_mask=key_padding_mask, need_weights=False,
                        attn_mask=attn_mask)  # fmt: skip


def route_copy(wrapped: nn.Module, decoder_path: str, integration, route_index: int):
    """A plain copy of ``wrapped`` (unwrapped) running route ``route_index`` alone."""
    model = copy.deepcopy(wrapped)
    decoder = model.get_submodule(decoder_path) if decoder_path else model
    state = decoder.mrdetr_routes
    route = state.routes[route_index]
    hosts = integration.layer_modules(decoder)
    aux = [dict(a.items()) for a in state.aux]
    adapters.unwrap(model)
    if route_index == 0:
        return model
    for host, owned in zip(hosts, aux, strict=True):
        own = owned.get(route.name)
        if own is None:
            continue
        layer = host.layer
        names = {id(m): n for n, m in layer.named_modules()}
        if hasattr(own, "self_attn_norm"):
            layer.set_submodule(names[id(host.self_attn_norm)], own.self_attn_norm)
        if hasattr(own, "ffn"):
            for m, copy_ in zip(host.ffn, own.ffn, strict=True):
                layer.set_submodule(names[id(m)], copy_)
        attn = getattr(own, "self_attn", host.self_attn)
        if hasattr(own, "tokens"):
            attn = InstructMHA(attn, own.tokens, own.tokens_pos)
        layer.set_submodule(names[id(host.self_attn)], attn)
    return model


def layer_outputs(model: nn.Module, layers, call):
    """``call()``'s result and every layer's output in order (forward hooks)."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o)) for m in layers]
    try:
        out = call()
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def randomise(module: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Perturb every parameter (norms, biases, copies) so that no two routes coincide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
