"""The criterion's dense part, eager against ``torch.compile(fullgraph=True)``.

``grouped_set_losses`` (mrdetr/criterion_batch.py) computes the class, L1 and GIoU losses of
every prediction set of a ``MultiRouteCriterion`` call at once: with Mr. DETR's three routes,
6 decoder layers and the encoder proposals, 19 sets of ``[B=4, Q=300, K=80]``. This script
times it forward + backward, eager and compiled, on pairs that change every step as in
training (one-to-one and one-to-many pair counts), and counts the eager step's ATen operations
(:class:`mrdetr.profiling.OpCounter`: kernel launches on a GPU; a dispatch mode cannot run
under ``torch.compile``, and Inductor's fused kernels are not ATen calls). The first compiled
steps (tracing, and one recompilation when the pair count first changes) are timed separately.

Run: ``python benchmarks/criterion_compile.py [--device cpu|cuda] [--classification
sigmoid|softmax] [--reps 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mrdetr.criterion_batch import grouped_set_losses
from mrdetr.profiling import OpCounter


def make_sets(device, step, b=4, q=300, k=80, n_sets=19, n_gt=50, logits_k=80):
    """Prediction sets and per-set flat pairs of one step (pair counts vary with ``step``)."""
    gen = torch.Generator().manual_seed(step)
    sets = []
    for i in range(n_sets):
        out = {
            "pred_logits": torch.randn(b, q, logits_k, generator=gen).to(device).requires_grad_(),
            "pred_boxes": (torch.rand(b, q, 4, generator=gen) * 0.4 + 0.2)
            .to(device)
            .requires_grad_(),
        }
        m = n_gt if i % 3 == 0 else 6 * n_gt - step % 7  # one-to-one / one-to-many routes
        image = torch.randint(0, b, (m,), generator=gen).to(device)
        pred = torch.randint(0, q, (m,), generator=gen).to(device)
        gt = torch.randint(0, n_gt, (m,), generator=gen).to(device)
        sets.append((out, (image, pred, gt)))
    labels = torch.randint(0, k, (n_gt,), generator=gen).to(device)
    boxes = torch.cat([torch.rand(n_gt, 2, generator=gen) * 0.6 + 0.2,
                       torch.rand(n_gt, 2, generator=gen) * 0.3 + 0.05], 1).to(device)  # fmt: skip
    return sets, labels, boxes


def step(fn, device, i, kw) -> float:
    """Milliseconds of one forward + backward of ``fn`` on step ``i``'s sets."""
    sets, labels, boxes = make_sets(device, i, logits_k=kw["logits_k"])
    num = torch.tensor(50.0, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    terms = fn(sets, labels, boxes, num, 0.25, 2.0, classification=kw["classification"])
    sum(v for t in terms for v in t.values()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classification", choices=["sigmoid", "softmax"], default="sigmoid")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    kw = {"classification": args.classification,
          "logits_k": 81 if args.classification == "softmax" else 80}  # fmt: skip
    compiled = torch.compile(grouped_set_losses, fullgraph=True)
    t0 = time.perf_counter()
    for i in range(3):  # trace, then the recompilation for changing pair counts
        step(compiled, device, i, kw)
    warm = time.perf_counter() - t0
    with OpCounter() as count:
        step(grouped_set_losses, device, 0, kw)
    for i in range(1, 3):
        step(grouped_set_losses, device, i, kw)
    rows = {"eager": [], "compiled": []}
    for i in range(3, 3 + args.reps):  # interleaved
        for name, fn in (("eager", grouped_set_losses), ("compiled", compiled)):
            rows[name].append(step(fn, device, i, kw))
    print(
        f"grouped_set_losses, 19 sets of [4, 300, {kw['logits_k']}], {args.classification}, "
        f"forward + backward ({device}, {torch.get_num_threads()} threads), median of "
        f"{args.reps}; compiled warm-up (3 steps) {warm:.1f} s"
    )
    base = statistics.median(rows["eager"])
    for name, runs in rows.items():
        ms = statistics.median(runs)
        print(f"  {name:<9} {ms:8.2f} ms  x{ms / base:.2f}")
    print(f"  eager ATen operations per step: {count.ops} (host reads {count.host_reads})")


if __name__ == "__main__":
    main()
