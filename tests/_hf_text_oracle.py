"""Unpacked oracle for the text-conditioned HF families (Grounding DINO, MM Grounding DINO,
OmDet-Turbo): their self-attention (``query/key/value/out_proj``, called ``(queries, keys,
values, attention_mask)``) with instruction tokens in front of the keys and values, written out
with matmul + softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InstructQKVAttention(nn.Module):
    """``host`` attention with instruction tokens (keys ``tokens + tokens_pos``, values
    ``tokens``) in front of its keys and values; every query row sees them."""

    def __init__(self, host, tokens, tokens_pos) -> None:
        super().__init__()
        self.host = host
        self.tokens, self.tokens_pos = tokens.detach().clone(), tokens_pos.detach().clone()

    def forward(self, queries, keys, values, attention_mask=None, output_attentions=False):
        h, (b, q, c), n = self.host, queries.shape, self.tokens.shape[0]
        heads = h.num_attention_heads
        keys = torch.cat([(self.tokens + self.tokens_pos).expand(b, n, c), keys], 1)
        values = torch.cat([self.tokens.expand(b, n, c), values], 1)

        def split(x):
            return x.view(b, x.shape[1], heads, c // heads).transpose(1, 2)

        logits = split(h.query(queries)) @ split(h.key(keys)).transpose(-1, -2)
        logits = logits * (c // heads) ** -0.5
        if attention_mask is not None:  # [B, 1, L, L] added; the token columns never masked
            logits = logits + F.pad(attention_mask, (n, 0))
        probs = logits.softmax(-1)
        out = (probs @ split(h.value(values))).transpose(1, 2).reshape(b, q, c)
        return h.out_proj(out), probs
