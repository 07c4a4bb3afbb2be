"""Benchmark: ``mrdetr.adapters.wrap`` on a torch ``nn.TransformerDecoder`` (DETR-sized).

A 6-layer ``nn.TransformerDecoder`` (C=256, 8 heads, FFN 2048, dropout 0, batch-first), 300
queries, batch 2, encoder memory of S tokens (default 850, a 25x34 DETR feature map), CPU.
Timed interleaved in one run (medians over ``--reps`` after ``--warmup``; ratios of the minima
too, robust to other processes on a shared machine):

- ``eval``: forward in eval mode, wrapped vs the unwrapped decoder (should be 1.0: the wrapped
  model calls the original forward and nothing else);
- ``train``: forward + backward of a loss on every route's output: the unwrapped decoder (one
  route), the wrapped decoder (Mr. DETR's 3 routes packed: one cross-attention call over 3 x 300
  queries), and the reference way (the same 3 routes as three separate decoder passes, each
  with its own route modules).

Usage::

    python benchmarks/wrap_torch_decoder.py [--reps 7] [--warmup 2] [--threads 2] [--memory 850]
        [--layers 6] [--queries 300]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mrdetr import adapters, routes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _adapter_oracle import route_copy  # noqa: E402  (each route as its own decoder copy)

C, HEADS, FFN_DIM, BATCH = 256, 8, 2048, 2


def build(layers: int, seed: int = 0) -> nn.TransformerDecoder:
    torch.manual_seed(seed)
    layer = nn.TransformerDecoderLayer(C, HEADS, FFN_DIM, dropout=0.0, batch_first=True)
    return nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(C))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", type=int, default=850)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--queries", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    plain = build(args.layers)
    wrapped = adapters.wrap(copy.deepcopy(plain), routes.mr_detr())
    integration = adapters.TorchDecoderIntegration()
    per_route = [route_copy(wrapped, "", integration, i) for i in range(3)]
    g = torch.Generator().manual_seed(1)
    tgt = torch.randn(BATCH, args.queries, C, generator=g)
    memory = torch.randn(BATCH, args.memory, C, generator=g, requires_grad=True)

    def eval_fn(model):
        def run():
            model.eval()
            with torch.no_grad():
                model(tgt, memory)

        return run

    def train_plain():
        plain.train()
        plain(tgt, memory).square().mean().backward()

    def train_wrapped():
        wrapped.train()
        out = wrapped(tgt, memory)
        aux = adapters.route_outputs(wrapped).outputs
        (out.square().mean() + sum(o.square().mean() for o in aux.values())).backward()

    def train_reference():
        loss = 0.0
        for model in per_route:
            model.train()
            loss = loss + model(tgt, memory).square().mean()
        loss.backward()

    cases = {
        "eval unwrapped": eval_fn(plain),
        "eval wrapped": eval_fn(wrapped),
        "train 1 route (unwrapped)": train_plain,
        "train 3 routes packed (wrap)": train_wrapped,
        "train 3 routes, 3 passes": train_reference,
    }
    times = {k: [] for k in cases}
    for rep in range(args.warmup + args.reps):
        for name, fn in cases.items():
            t = timed(fn)
            if rep >= args.warmup:
                times[name].append(t)
    print(f"threads={args.threads} S={args.memory} Q={args.queries} B={BATCH} layers={args.layers}")
    for name, ts in times.items():
        print(
            f"{name:32s} median {1e3 * statistics.median(ts):8.1f} ms  min {1e3 * min(ts):8.1f} ms"
        )

    def ratio(a, b):
        med = statistics.median(times[a]) / statistics.median(times[b])
        return f"{med:.2f}x (minima {min(times[a]) / min(times[b]):.2f}x)"

    print("eval wrapped / unwrapped:         ", ratio("eval wrapped", "eval unwrapped"))
    base = "train 1 route (unwrapped)"
    print("train packed 3 routes / 1 route:  ", ratio("train 3 routes packed (wrap)", base))
    print("train 3 passes / 1 route:         ", ratio("train 3 routes, 3 passes", base))


if __name__ == "__main__":
    main()
