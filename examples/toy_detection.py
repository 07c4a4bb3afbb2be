"""Train a compact Deformable-DETR with and without Mr. DETR's routes; compare COCO AP.

    python examples/toy_detection.py --quick            # smoke run, < 3 minutes on 2 cores
    python examples/toy_detection.py                    # the demo (make demo), < 20 minutes
    python examples/toy_detection.py --train-ann train.json --train-images train/ \\
        --val-ann val.json --val-images val/ --image-size 256   # your own COCO data
    torchrun --nproc_per_node 2 examples/toy_detection.py --quick   # DDP on gloo

Both runs (``--routes baseline,mr_detr``) start from the same weights and see the same data in the
same order for the same steps; only the primary route is evaluated (pycocotools bbox AP). Writes to
``--out``: ``results.json``, ``convergence.png``, ``attention.png``, ``detections.png``,
``report.md``, the synthetic data as COCO files (``data/``) and one checkpoint per run
(``<routes>/last.pt``, continued by ``--resume``).

Importable pieces (``sys.path`` must hold ``examples/``):

- ``toy.data``: ``make_dataset(num_images, image_size, seed)`` (synthetic shapes, exact masks),
  ``load_coco(ann_file, image_dir, image_size)``, ``write_coco``, ``batch``, ``DetectionData``;
- ``toy.model``: ``ToyDETRConfig``, ``build_model(cfg)``, ``ROUTE_SETS`` (the ``--routes``
  presets; add a name there to register another route set);
- ``toy.train``: ``TrainConfig``, ``train(model_cfg, train_cfg, train_data, val_data, run_dir)``,
  ``init_model``, ``build_criterion``;
- ``toy.evaluate``: ``predict(model, images)``, ``evaluate(model, data)``, ``coco_stats``;
- ``toy.method_eval``: ``predict_route`` (any route, NMS), ``paper_columns`` (o2o AP, o2m AP
  with NMS, gap), ``mask_stats`` (mask AP beside box AP with ``--masks``);
- ``toy.plots``: ``plot_convergence``, ``plot_attention``, ``plot_detections``, ``write_report``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from toy import coco as toy_coco
from toy import data as toy_data  # noqa: E402
from toy.method_eval import mask_stats, method_report, paper_columns  # noqa: E402
from toy.model import ROUTE_SETS, ToyDETRConfig  # noqa: E402
from toy.plots import plot_attention, plot_convergence, plot_detections, write_report  # noqa: E402
from toy.train import TrainConfig, train  # noqa: E402

QUICK = dict(
    train_images=512,
    val_images=48,
    image_size=64,
    max_objects=3,
    min_frac=0.2,
    steps=200,
    eval_every=50,
    dim=64,
    ffn_dim=128,
    num_heads=4,
    num_queries=30,
    num_instruction_tokens=4,
    backbone_width=16,
    batch_size=8,
    lr=1e-3,
)
DEFAULT = dict(
    train_images=2000,
    val_images=150,
    image_size=64,
    max_objects=8,
    min_frac=0.12,
    steps=2000,
    eval_every=500,
    dim=64,
    ffn_dim=256,
    num_heads=4,
    num_queries=100,
    num_instruction_tokens=10,
    backbone_width=32,
    batch_size=8,
    lr=4e-4,
)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="toy_detection_out", help="output folder")
    p.add_argument("--quick", action="store_true", help="small smoke-test settings")
    p.add_argument(
        "--routes",
        default="baseline,mr_detr",
        help=f"comma-separated route sets to train, from {sorted(ROUTE_SETS)}",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--seed", type=int, default=0)
    for name in ("train-ann", "train-images", "val-ann", "val-images"):
        p.add_argument(f"--{name}", default=None, help="your own COCO data (all four together)")
    for name, typ in (
        ("steps", int),
        ("batch-size", int),
        ("image-size", int),
        ("train-images-count", int),
        ("val-images-count", int),
        ("eval-every", int),
        ("num-queries", int),
        ("dim", int),
        ("lr", float),
        ("aux-route-weight", float),
        ("o2m-k", int),
        ("threads", int),
    ):
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument(
        "--two-stage",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="queries from top-k encoder proposals; Route-3 gets its own (default on)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument(
        "--masks",
        action="store_true",
        help="add the mask head (mrdetr.segmentation); report mask AP beside box AP",
    )
    p.add_argument("--nms-iou", type=float, default=0.7,
                   help="NMS IoU threshold of the one-to-many route's evaluation")  # fmt: skip
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> tuple[dict, ToyDETRConfig, TrainConfig]:
    """Resolve ``--quick`` / defaults / explicit options into data, model and train settings."""
    base = dict(QUICK if args.quick else DEFAULT)
    pick = lambda key, opt: base[key] if opt is None else opt  # noqa: E731
    data_cfg = {
        "train_images": pick("train_images", args.train_images_count),
        "val_images": pick("val_images", args.val_images_count),
        "image_size": pick("image_size", args.image_size),
        "seed": args.seed,
        "max_objects": base["max_objects"],
        "min_frac": base["min_frac"],
    }
    model_cfg = ToyDETRConfig(
        dim=pick("dim", args.dim),
        ffn_dim=base["ffn_dim"],
        num_heads=base["num_heads"],
        backbone_width=base["backbone_width"],
        num_queries=pick("num_queries", args.num_queries),
        num_instruction_tokens=base["num_instruction_tokens"],
        two_stage=args.two_stage,
        masks=args.masks,
    )
    train_cfg = TrainConfig(
        steps=pick("steps", args.steps),
        batch_size=pick("batch_size", args.batch_size),
        eval_every=pick("eval_every", args.eval_every),
        lr=pick("lr", args.lr),
        seed=args.seed,
    )
    for field, opt in (("aux_route_weight", args.aux_route_weight), ("o2m_k", args.o2m_k)):
        if opt is not None:
            train_cfg = replace(train_cfg, **{field: opt})
    return data_cfg, model_cfg, train_cfg


def load_data(args, data_cfg: dict, out: Path, rank: int):
    """Train / val :class:`DetectionData`: the user's COCO files, or the synthetic shapes."""
    user = [args.train_ann, args.train_images, args.val_ann, args.val_images]
    if any(v is not None for v in user):
        if not all(v is not None for v in user):
            raise SystemExit(
                "error: --train-ann, --train-images, --val-ann and --val-images "
                "must be given together"
            )
        size = data_cfg["image_size"]
        return (
            toy_coco.load_coco(args.train_ann, args.train_images, size),
            toy_coco.load_coco(args.val_ann, args.val_images, size),
        )
    size, seed = data_cfg["image_size"], data_cfg["seed"]
    shape = dict(max_objects=data_cfg["max_objects"], min_frac=data_cfg["min_frac"])
    train_set = toy_data.make_dataset(data_cfg["train_images"], size, 2 * seed, **shape)
    val_set = toy_data.make_dataset(data_cfg["val_images"], size, 2 * seed + 1, **shape)
    if rank == 0:
        toy_data.write_coco(val_set, out / "data", "val")
        (out / "data" / "train.json").write_text(json.dumps(train_set.coco))
    return train_set, val_set


def main(argv=None) -> dict:
    """Run the demo; returns the results dict written to ``results.json``."""
    args = parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.routes.split(",") if n.strip()]
    for n in names:
        if n not in ROUTE_SETS:
            raise SystemExit(
                f"error: --routes: unknown route set {n!r}; choose from {sorted(ROUTE_SETS)}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_cfg, model_cfg, train_cfg = settings(args)
    train_set, val_set = load_data(args, data_cfg, out, rank)
    model_cfg = replace(model_cfg, num_classes=train_set.num_classes)
    models, histories, results = {}, {}, {}
    for name in names:
        t0 = time.perf_counter()
        model, hist = train(
            replace(model_cfg, routes=name),
            train_cfg,
            train_set,
            val_set,
            out / name,
            resume=args.resume,
            progress=not args.no_progress,
            desc=name,
        )
        models[name], histories[name] = model.eval(), hist
        final = hist["evals"][-1]
        results[name] = {
            **{k: v for k, v in final.items() if k not in ("step", "seconds")},
            "steps": hist["steps"],
            "seconds_per_step": hist["seconds"] / max(hist["steps"], 1),
            "run_seconds": time.perf_counter() - t0,
            "history": hist["evals"],
        }
        paper = paper_columns(model, val_set, args.nms_iou)  # o2o AP, o2m AP with NMS, gap
        if paper is not None:
            results[name]["paper"] = paper
        if args.masks:
            results[name]["masks"] = mask_stats(model, val_set)
    if rank == 0:
        results["settings"] = {
            "data": data_cfg,
            "model": model_cfg.to_dict(),
            "train": train_cfg.to_dict(),
            "routes": names,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "threads": torch.get_num_threads(),
            "user_data": args.train_ann is not None,
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
        plot_convergence(histories, out / "convergence.png")
        attn_model = next(
            (m for m in models.values() if any(r.num_instruction_tokens for r in m.route_set)), None
        )
        if attn_model is not None:
            plot_attention(attn_model, val_set, out / "attention.png")
        plot_detections(models, val_set, out / "detections.png")
        runs = {k: v for k, v in results.items() if k != "settings"}
        print(write_report(runs, out / "report.md"))
        extra = method_report(runs)  # paper's o2o / o2m-with-NMS columns, mask AP
        if extra:
            with open(out / "report.md", "a") as f:
                f.write(extra)
            print(extra)
        print(f"outputs in {out}/")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
