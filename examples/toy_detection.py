"""Train a compact Deformable-DETR with and without Mr. DETR's routes; compare COCO AP.

    python examples/toy_detection.py --quick            # smoke test of the pipeline, ~1 minute
    python examples/toy_detection.py                    # the demo (make demo)
    python examples/toy_detection.py --device cuda --amp bf16   # on a GPU (auto picks CUDA)
    python examples/toy_detection.py --train-ann train.json --train-images train/ \\
        --val-ann val.json --val-images val/ --image-size 256   # your own COCO data
    torchrun --nproc_per_node 2 examples/toy_detection.py --quick   # DDP: gloo, nccl on CUDA

Both runs (``--routes baseline,mr_detr``) start from the same weights and see the same data in the
same order for the same steps; only the primary route is evaluated (pycocotools bbox AP, 0-1).
Step costs are measured interleaved in one process (``toy.cost``); with ``--equal-time`` (default
on CUDA) the baseline is also trained for the steps that Mr. DETR's time buys. Writes to
``--out``: ``results.json``, ``convergence.png``, ``attention.png``, ``detections.png``,
``report.md``, the synthetic data as COCO files (``data/``) and one checkpoint per run
(``<routes>/last.pt``, continued by ``--resume``).

Importable pieces (``sys.path`` must hold ``examples/``):

- ``toy.cli``: ``parse_args``, ``settings``, ``resolve_device``, the presets;
- ``toy.checks``: ``load_pair`` (a user's train + val checked together); ``toy.cost``:
  ``measure_step_cost``; ``toy.report``: ``write_report``; ``toy.checkpoint``: ``save``, ``load``;
- ``toy.data``: ``make_dataset(num_images, image_size, seed)`` (synthetic shapes, exact masks),
  ``load_coco(ann_file, image_dir, image_size)``, ``write_coco``, ``batch``, ``DetectionData``;
- ``toy.model``: ``ToyDETRConfig``, ``build_model(cfg)``, ``ROUTE_SETS`` (the ``--routes``
  presets; add a name there to register another route set);
- ``toy.train``: ``TrainConfig``, ``train(model_cfg, train_cfg, train_data, val_data, run_dir)``,
  ``init_model``, ``build_criterion``;
- ``toy.evaluate``: ``predict(model, images)``, ``evaluate(model, data)``, ``coco_stats``;
- ``toy.method_eval``: ``predict_route`` (any route, NMS), ``paper_columns`` (o2o AP, o2m AP
  with NMS, gap), ``mask_stats`` (mask AP beside box AP with ``--masks``);
- ``toy.plots``: ``plot_convergence``, ``plot_attention``, ``plot_detections``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from toy import data as toy_data  # noqa: E402
from toy.checks import load_pair  # noqa: E402
from toy.cli import parse_args, resolve_device, set_threads, settings, show_progress  # noqa: E402
from toy.cost import measure_step_cost  # noqa: E402
from toy.method_eval import mask_stats, method_report, paper_columns  # noqa: E402
from toy.plots import plot_attention, plot_convergence, plot_detections  # noqa: E402
from toy.report import write_report  # noqa: E402
from toy.train import train  # noqa: E402


def load_data(args, data_cfg: dict, out: Path, rank: int):
    """Train / val :class:`DetectionData`: the user's COCO files, or the synthetic shapes."""
    user = [args.train_ann, args.train_images, args.val_ann, args.val_images]
    if any(v is not None for v in user):
        if not all(v is not None for v in user):
            raise SystemExit(
                "error: --train-ann, --train-images, --val-ann and --val-images "
                "must be given together"
            )
        return load_pair(*user, data_cfg["image_size"])
    size, seed = data_cfg["image_size"], data_cfg["seed"]
    shape = dict(max_objects=data_cfg["max_objects"], min_frac=data_cfg["min_frac"])
    train_set = toy_data.make_dataset(data_cfg["train_images"], size, 2 * seed, **shape)
    val_set = toy_data.make_dataset(data_cfg["val_images"], size, 2 * seed + 1, **shape)
    if rank == 0:
        toy_data.write_coco(val_set, out / "data", "val")
        (out / "data" / "train.json").write_text(json.dumps(train_set.coco))
    return train_set, val_set


def _init_distributed(device: torch.device) -> int:
    if "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def _summary(name: str, hist: dict, t0: float) -> dict:
    final = hist["evals"][-1]
    losses = hist["losses"]
    n = max(1, min(10, len(losses) // 4))
    return {
        **{k: v for k, v in final.items() if k not in ("step", "seconds")},
        "steps": hist["steps"],
        "seconds_per_step": hist["seconds"] / max(hist["steps"], 1),
        "run_seconds": time.perf_counter() - t0,
        "loss_start": statistics.mean(losses[:n]) if losses else None,
        "loss_end": statistics.mean(losses[-n:]) if losses else None,
        "history": hist["evals"],
    }


def _step_cost(args, model_cfg, train_cfg, train_set, names, device, rank) -> dict | None:
    """Seconds per step of every route set, measured interleaved on rank 0 (``toy.cost``)."""
    cost = [None]
    if rank == 0 and ("baseline" in names and len(names) > 1):
        sec = measure_step_cost(model_cfg, train_cfg, train_set, names, device, args.amp)
        cost = [{"device": str(device), "seconds_per_step": sec}]
    if dist.is_initialized():
        dist.broadcast_object_list(cost, src=0)
    return cost[0]


def main(argv=None) -> dict:
    """Run the demo; returns the results dict written to ``results.json``."""
    args = parse_args(argv)
    device = resolve_device(args)
    rank = _init_distributed(device)
    set_threads(args, device)
    names, out = args.route_names, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_cfg, model_cfg, train_cfg = settings(args, device)
    train_set, val_set = load_data(args, data_cfg, out, rank)  # checked before any training
    model_cfg = replace(model_cfg, num_classes=train_set.num_classes)
    cost = _step_cost(args, model_cfg, train_cfg, train_set, names, device, rank)
    equal_time = args.equal_time if args.equal_time is not None else (
        device.type == "cuda" and not args.quick)  # fmt: skip
    runs = [(name, name, train_cfg) for name in names]
    if equal_time and cost and "mr_detr" in names:
        sec = cost["seconds_per_step"]
        steps = round(train_cfg.steps * sec["mr_detr"] / sec["baseline"])
        every = max(1, round(train_cfg.eval_every * steps / train_cfg.steps))
        runs.append(("baseline_equal_time", "baseline",
                     replace(train_cfg, steps=steps, eval_every=every)))  # fmt: skip
    progress = show_progress(args)
    models, histories, results = {}, {}, {}
    for run, routes, cfg in runs:
        t0 = time.perf_counter()
        model, hist = train(replace(model_cfg, routes=routes), cfg, train_set, val_set, out / run,
                            resume=args.resume, progress=progress, desc=run, device=device,
                            amp=args.amp)  # fmt: skip
        histories[run], results[run] = hist, _summary(run, hist, t0)
        if run == "baseline_equal_time":
            continue
        models[run] = model.eval()
        paper = paper_columns(model, val_set, args.nms_iou)  # o2o AP, o2m AP with NMS, gap
        if paper is not None:
            results[run]["paper"] = paper
        if args.masks:
            results[run]["masks"] = mask_stats(model, val_set)
    if rank == 0:
        results["settings"] = {
            "data": data_cfg, "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
            "routes": names, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "threads": torch.get_num_threads(), "user_data": args.train_ann is not None,
            "device": str(device), "amp": args.amp, "quick": args.quick, "step_cost": cost,
        }  # fmt: skip
        (out / "results.json").write_text(json.dumps(results, indent=1))
        run_cost = None
        if cost:
            sec = cost["seconds_per_step"]
            run_cost = {run: sec[routes] for run, routes, _ in runs}
        plot_convergence(histories, out / "convergence.png", run_cost, str(device))
        attn_model = next(
            (m for m in models.values() if any(r.num_instruction_tokens for r in m.route_set)), None
        )
        if attn_model is not None:
            plot_attention(attn_model, val_set, out / "attention.png")
        plot_detections(models, val_set, out / "detections.png")
        main_runs = {k: results[k] for k in models}
        sentence = write_report(main_runs, out / "report.md", quick=args.quick, cost=cost,
                                equal_time=results.get("baseline_equal_time"))  # fmt: skip
        extra = method_report(main_runs)  # paper's o2o / o2m-with-NMS columns, mask AP
        if extra:
            with open(out / "report.md", "a") as f:
                f.write(extra)
        print(sentence)
        print(f"report: {out / 'report.md'}; outputs in {out}/")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
