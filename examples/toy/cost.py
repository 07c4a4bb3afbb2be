"""Step cost of each route set, measured in one process with the steps interleaved.

Two runs timed one after the other each see their own share of the machine's load (on a shared
machine one run can take twice as long per step as the other for no reason of its own). Here the
route sets' steps alternate (``A B A B ...``) on the same batches in one process, so load drifts
hit both alike; the median over the measured steps is each route set's seconds per step, and the
ratio of two medians is the equal-time exchange rate that ``report.md`` and ``convergence.png``
use (a Mr. DETR step buys ``ratio`` baseline steps).

    python examples/toy/cost.py --quick        # prints seconds per step and the ratio
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

__all__ = ["measure_step_cost"]


def measure_step_cost(
    model_cfg,
    train_cfg,
    train_data,
    route_names,
    device="cpu",
    amp: str | None = None,
    steps: int = 8,
    warmup: int = 2,
) -> dict[str, float]:
    """Median training seconds per step of every route set in ``route_names``, interleaved.

    Each route set gets its own model (``init_model``), criterion and AdamW, and runs
    ``warmup`` untimed then ``steps`` timed steps, alternating with the others on the same
    batches of ``train_cfg.batch_size`` images of ``train_data``. Returns ``{name: seconds}``.
    """
    from .data import batch
    from .train import build_criterion, init_model, to_device, train_step

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    device = torch.device(device)
    runs = {}
    for name in route_names:
        model = init_model(replace(model_cfg, routes=name), train_cfg.seed).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), train_cfg.lr)
        runs[name] = (model, build_criterion(model, train_cfg), opt)
    times = {name: [] for name in route_names}
    n = len(train_data)
    for i in range(warmup + steps):
        idx = [(i * train_cfg.batch_size + j) % n for j in range(train_cfg.batch_size)]
        images, targets = to_device(*batch(train_data, idx), device)
        for name, (model, criterion, opt) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            train_step(model, criterion, opt, images, targets, train_cfg.clip, amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _main() -> None:
    import sys
    from pathlib import Path

    here = Path(__file__).resolve()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here.parent]
    sys.path.insert(0, str(here.parents[1]))  # examples/: the toy package
    from toy.cli import parse_args, resolve_device, set_threads, settings
    from toy.cost import measure_step_cost as measure
    from toy.data import make_dataset

    args = parse_args(sys.argv[1:])
    device = resolve_device(args)
    set_threads(args, device)
    data_cfg, model_cfg, train_cfg = settings(args, device)
    shape = {k: data_cfg[k] for k in ("max_objects", "min_frac")}
    data = make_dataset(4 * train_cfg.batch_size, data_cfg["image_size"], 0, **shape)
    cost = measure(model_cfg, train_cfg, data, args.route_names, device, args.amp)
    for name, sec in cost.items():
        print(f"{name}: {sec:.4f} s/step on {device}")
    base = cost.get("baseline")
    for name, sec in cost.items():
        if base and name != "baseline":
            print(f"{name} / baseline: {sec / base:.2f}x")


if __name__ == "__main__":
    _main()
