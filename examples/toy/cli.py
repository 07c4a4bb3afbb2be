"""Command line of the toy demo: options, presets (``--quick``, CPU, GPU) and device choice.

``parse_args(argv)`` -> ``argparse.Namespace``; ``resolve_device(args)`` -> ``torch.device``
(``--device auto`` picks CUDA when available); ``settings(args, device)`` -> ``(data settings,
ToyDETRConfig, TrainConfig)`` from the preset of the run (``QUICK``, ``DEFAULT`` or, on a CUDA
device, ``GPU``) overridden by explicit options.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

from .model import ROUTE_SETS, ToyDETRConfig
from .train import TrainConfig

__all__ = [
    "DEFAULT", "GPU", "QUICK", "parse_args", "resolve_device", "set_threads", "settings",
    "show_progress",
]  # fmt: skip

QUICK = dict(
    train_images=256, val_images=32, image_size=64, max_objects=3, min_frac=0.2, steps=100,
    eval_every=50, dim=64, ffn_dim=128, num_heads=4, num_queries=30, num_instruction_tokens=4,
    backbone_width=16, batch_size=8, lr=1e-3,
)  # fmt: skip
"""``--quick``: a smoke test of the pipeline (about a minute on 2 CPU cores), too short to
compare methods."""
DEFAULT = dict(
    train_images=2000, val_images=150, image_size=64, max_objects=8, min_frac=0.12, steps=2000,
    eval_every=500, dim=64, ffn_dim=256, num_heads=4, num_queries=100, num_instruction_tokens=10,
    backbone_width=32, batch_size=8, lr=4e-4,
)  # fmt: skip
"""The demo on the CPU (``make demo``): the settings of docs/benchmarks.md's seed study."""
GPU = {**DEFAULT, "train_images": 4000, "batch_size": 32, "lr": 8e-4}
"""The demo on a CUDA device: the CPU demo's model and steps with a 4x batch (lr x2, the
square-root rule) and twice the training images."""


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(description="Toy detection: baseline vs Mr. DETR, COCO AP")
    p.add_argument("--out", default="toy_detection_out", help="output folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test of the pipeline (too short to compare methods)",
    )
    p.add_argument(
        "--routes",
        default="baseline,mr_detr",
        help=f"comma-separated route sets to train, from {sorted(ROUTE_SETS)}",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: CUDA when available, else the CPU",
    )
    p.add_argument(
        "--amp",
        default=None,
        choices=("bf16",),
        help="bfloat16 autocast of the forward pass (CUDA only)",
    )
    p.add_argument(
        "--equal-time",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train the baseline for as many steps as Mr. DETR's training time "
        "buys (step costs measured interleaved); default: on with CUDA, off on "
        "the CPU and with --quick",
    )
    for name in ("train-ann", "train-images", "val-ann", "val-images"):
        p.add_argument(f"--{name}", default=None, help="your own COCO data (all four together)")
    for name, typ in (
        ("steps", int), ("batch-size", int), ("image-size", int), ("train-images-count", int),
        ("val-images-count", int), ("eval-every", int), ("num-queries", int), ("dim", int),
        ("lr", float), ("aux-route-weight", float), ("o2m-k", int), ("threads", int),
    ):  # fmt: skip
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument(
        "--two-stage",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="queries from top-k encoder proposals; Route-3 gets its own (default on)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (also off when stdout or stderr is not a terminal)",
    )
    p.add_argument(
        "--masks",
        action="store_true",
        help="add the mask head (mrdetr.segmentation); report mask AP beside box AP",
    )
    p.add_argument(
        "--nms-iou",
        type=float,
        default=0.7,
        help="NMS IoU threshold of the one-to-many route's evaluation",
    )
    args = p.parse_args(argv)
    args.route_names = [n.strip() for n in args.routes.split(",") if n.strip()]
    for n in args.route_names:
        if n not in ROUTE_SETS:
            raise SystemExit(
                f"error: --routes: unknown route set {n!r}; choose from {sorted(ROUTE_SETS)}"
            )
    return args


def resolve_device(args: argparse.Namespace) -> torch.device:
    """``--device`` as a ``torch.device`` (the local rank's GPU under ``torchrun``); refuses
    ``--device cuda`` without CUDA and ``--amp`` without a CUDA device."""
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("error: --device cuda: torch.cuda.is_available() is False on this machine")
    use_cuda = args.device == "cuda" or (args.device == "auto" and cuda)
    if args.amp and not use_cuda:
        raise SystemExit(
            f"error: --amp {args.amp} needs a CUDA device (--device cuda); on the CPU the demo "
            "trains in float32"
        )
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def set_threads(args: argparse.Namespace, device: torch.device) -> int:
    """``torch.set_num_threads``: ``--threads``, else 1 on the CPU (the toy's ops are too small
    to gain from more, and on a shared machine several OpenMP threads per process thrash: the
    quick run took 5 min 45 s with 2 threads and 56 s with 1 on a loaded 2-core VM), else
    torch's default. Returns the count."""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)
    return torch.get_num_threads()


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--no-progress`` or output goes to a file or pipe."""
    return not args.no_progress and sys.stdout.isatty() and sys.stderr.isatty()


def settings(args: argparse.Namespace, device: torch.device | None = None):
    """``(data settings dict, ToyDETRConfig, TrainConfig)``: the run's preset (``QUICK`` with
    ``--quick``, else ``GPU`` on a CUDA device, else ``DEFAULT``) overridden by explicit
    options."""
    gpu = device is not None and device.type == "cuda"
    base = dict(QUICK if args.quick else GPU if gpu else DEFAULT)
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
