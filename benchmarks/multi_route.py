"""Benchmark: Mr. DETR decoder layer, 3 routes packed vs 1 route vs a naive three-pass layer.

Forward + backward of one ``MultiRouteDecoderLayer`` (C=256, FFN 2048, 8 heads, 4 levels,
4 points, training mode, dropout 0.0 and 0.1) on encoder memory of levels (100,150), (50,75),
(25,38), (13,19) (S = 19947), batch 2, for Q = 300 and 900 queries per route. The memory
requires grad, as in a full detector. Three configurations, timed interleaved in the same run:

- ``1-route``: the primary route alone (R = 1: what a plain Deformable-DETR layer does);
- ``packed``: Mr. DETR's 3 routes through the packed layer;
- ``naive``: the same 3 routes as three separate full passes (the reference design: every pass
  re-projects the memory and re-runs shared modules).

Times are medians over ``--reps`` interleaved repetitions after ``--warmup``; ratios from the
minima are printed too (robust to other processes on a shared machine).

Usage::

    python benchmarks/multi_route.py [--reps 7] [--warmup 2] [--queries 300 900] [--threads 2]
        [--dropout 0.0 0.1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mrdetr import routes
from mrdetr.layers.multi_route import MultiRouteDecoderLayer

LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
C, FFN_DIM, HEADS, POINTS, BATCH = 256, 2048, 8, 4, 2


def naive_three_pass(layer, query, pos, ref, value, shapes, starts):
    """The routes as separate full passes (one deformable call, one value projection each)."""
    outs = []
    for i, route in enumerate(layer.routes):
        aux = layer.aux[route.name] if i else None
        if route.num_instruction_tokens:
            y = aux.self_attn(query[i], pos[i], projections=layer.self_attn)
            x = aux.norm1(query[i] + layer.dropout(y))
        else:
            x = layer.norm1(query[i] + layer.dropout(layer.self_attn(query[i], pos[i])))
        y = layer.cross_attn(x + pos[i], ref[i], value, shapes, starts)
        x = layer.norm2(x + layer.dropout(y))
        ffn = aux.ffn if route.own_ffn else layer.ffn
        outs.append(layer.norm3(x + layer.dropout(ffn(x))))
    return torch.stack(outs)


def make_inputs(num_queries: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.long)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s = int(areas.sum())
    r, q = 3, num_queries
    query = torch.randn(r, BATCH, q, C, generator=g)
    pos = torch.randn(r, BATCH, q, C, generator=g)
    centre = torch.rand(r, BATCH, q, 2, generator=g)
    boxes = torch.cat([centre, 0.05 + 0.2 * torch.rand(r, BATCH, q, 2, generator=g)], -1)
    ref = boxes[:, :, :, None].expand(-1, -1, -1, len(LEVELS), -1).contiguous()
    value = torch.randn(BATCH, s, C, generator=g)
    return query, pos, ref, value, shapes, starts


def step(layer, fn, r, inputs) -> float:
    query, pos, ref, value, shapes, starts = inputs
    query, pos, ref = query[:r], pos[:r], ref[:r]
    value = value.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    if fn is None:
        out = layer(
            query, query_pos=pos, reference_points=ref, value=value,
            spatial_shapes=shapes, level_start_index=starts,
        )  # fmt: skip
    else:
        out = fn(layer, query, pos, ref, value, shapes, starts)
    out.square().mean().backward()
    return time.perf_counter() - t0


def bench(
    num_queries: int, dropout: float, reps: int, warmup: int, backend: str
) -> dict[str, float]:
    torch.manual_seed(0)
    layer = MultiRouteDecoderLayer(
        C, HEADS, FFN_DIM, len(LEVELS), POINTS, dropout, routes=routes.mr_detr(), backend=backend
    ).train()
    inputs = make_inputs(num_queries)
    configs = {"1-route": (None, 1), "packed": (None, 3), "naive": (naive_three_pass, 3)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for i in range(warmup + reps):
        for name, (fn, r) in configs.items():
            t = step(layer, fn, r, inputs)
            if i >= warmup:
                times[name].append(t)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--queries", type=int, nargs="+", default=[300, 900])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, backend {args.backend}")
    print("| Q | dropout | 1-route (ms) | packed 3-route (ms) | naive 3-pass (ms) "
          "| packed / 1-route | naive / packed | same, from the minima |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for q in args.queries:
        for p in args.dropout:
            m = bench(q, p, args.reps, args.warmup, args.backend)
            (one, one_min), (packed, packed_min), (naive, naive_min) = (
                m["1-route"], m["packed"], m["naive"],
            )  # fmt: skip
            print(
                f"| {q} | {p} | {1e3 * one:.0f} | {1e3 * packed:.0f} | {1e3 * naive:.0f} "
                f"| {packed / one:.2f}x | {naive / packed:.2f}x "
                f"| {packed_min / one_min:.2f}x / {naive_min / packed_min:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
