"""Shared helpers for the ms_deform_attn tests: random inputs and the backends to test."""

from __future__ import annotations

import pytest
import torch

BACKENDS = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


def make_inputs(
    batch=2,
    queries=5,
    heads=2,
    dim=4,
    levels=((6, 9), (3, 5), (1, 2)),
    points=3,
    dtype=torch.float64,
    device="cpu",
    spread=0.3,
    seed=0,
):
    """Random op inputs; ``spread`` pushes sampling points that far outside [0, 1] on each side."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(levels, dtype=torch.int64)
    sizes = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s, nl = int(sizes.sum()), len(levels)
    value = torch.randn(batch, s, heads, dim, generator=g, dtype=torch.float64)
    loc = torch.rand(batch, queries, heads, nl, points, 2, generator=g, dtype=torch.float64)
    loc = loc * (1 + 2 * spread) - spread
    attn = torch.rand(batch, queries, heads, nl, points, generator=g, dtype=torch.float64)
    floats = [t.to(device=device, dtype=dtype) for t in (value, loc, attn)]
    return floats[0], ss.to(device), lsi.to(device), floats[1], floats[2]
