"""ATen operations and host reads of one ``MultiRouteCriterion`` call (machine-independent).

The call: Mr. DETR's three routes (``routes.mr_detr()``: one one-to-one route, two one-to-many
routes), 6 decoder layers each plus two-stage encoder proposals on every route, batch 4, 300
queries, 80 classes, 5-20 gt boxes per image, forward and backward. Counted with
:class:`mrdetr.profiling.OpCounter`; a host read is a device-to-host synchronisation on a GPU
(on the CPU nothing waits, but the count is the same).

Run: ``python benchmarks/criterion.py [--device cpu|cuda] [--classification sigmoid|softmax]``.
"""

from __future__ import annotations

import argparse
import inspect

import torch

from mrdetr import routes
from mrdetr.criterion import MultiRouteCriterion
from mrdetr.matching import RouteMatcher
from mrdetr.profiling import OpCounter


def make_batch(device, b=4, q=300, k=80, layers=6, enc=300, seed=0, logits=None):
    gen = torch.Generator().manual_seed(seed)
    logits_k = k if logits is None else logits

    def pred(n):
        logits = torch.randn(b, n, logits_k, generator=gen).to(device).requires_grad_()
        boxes = (torch.rand(b, n, 4, generator=gen) * 0.4 + 0.2).to(device).requires_grad_()
        return {"pred_logits": logits, "pred_boxes": boxes}

    outputs = {}
    for route in routes.mr_detr():
        sets = [pred(q) for _ in range(layers)]
        outputs[route.name] = {**sets[-1], "aux_outputs": sets[:-1], "enc_outputs": pred(enc)}
    targets = []
    for i in range(b):
        n = 5 + 5 * i
        cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        labels = torch.randint(0, k, (n,), generator=gen)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([cxcy, wh], 1).to(device)})
    return outputs, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classification", default="sigmoid")
    args = parser.parse_args()
    device = torch.device(args.device)
    kwargs = {}
    if "classification" in inspect.signature(MultiRouteCriterion).parameters:
        kwargs["classification"] = args.classification  # absent before issue 19 (old checkouts)
    matcher = RouteMatcher.for_routes(routes.mr_detr(), **kwargs)
    criterion = MultiRouteCriterion(80, matcher, **kwargs)
    logits = 81 if args.classification == "softmax" else 80
    outputs, targets = make_batch(device, logits=logits)
    criterion(outputs, targets)["loss"].backward()  # warm-up
    rows = []
    for phase in ("forward", "forward+backward"):
        outputs, targets = make_batch(device, logits=logits)
        with OpCounter() as count:
            loss = criterion(outputs, targets)["loss"]
            if phase != "forward":
                loss.backward()
        rows.append((phase, count.ops, count.host_reads, dict(count.read_ops)))
    print(
        f"MultiRouteCriterion, 3 routes x 6 layers + encoder, B=4, Q=300, K=80, "
        f"{args.classification} ({device})"
    )
    print(f"{'phase':<18} {'ATen ops':>9} {'host reads':>11}  reads by op")
    for phase, ops, reads, by in rows:
        print(f"{phase:<18} {ops:>9} {reads:>11}  {by}")


if __name__ == "__main__":
    main()
