"""Training loop of the toy detector: ``TrainConfig``, ``train(...)``, checkpoints, DDP.

``train(model_cfg, train_cfg, train_data, val_data, run_dir)`` trains one route set and returns
its history (primary-route COCO stats every ``eval_every`` steps, training seconds, losses).
Runs with the same seed see the same initial weights on every module they share (the auxiliary
routes' extra modules are drawn after), the same data order and the same flips (drawn per step
and image, so a DDP run's global batch equals the single-process one). Under ``torchrun``
(``torch.distributed`` initialised) the model is wrapped in DDP, a ``DistributedSampler`` splits
each global batch and the criterion averages the box count across processes.
``run_dir/last.pt`` is written at every evaluation step before the evaluation runs (a failing
evaluation never loses the training) and again after it; ``resume=True`` continues from it.
``device`` picks where it trains; ``amp="bf16"`` autocasts the forward pass (CUDA).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from mrdetr import HungarianMatcher, MultiRouteCriterion, OneToManyMatcher, RouteMatcher
from mrdetr.segmentation import MaskLoss

from . import checkpoint
from .data import DetectionData, batch
from .evaluate import evaluate
from .model import ToyDETRConfig, build_model

__all__ = ["TrainConfig", "build_criterion", "init_model", "train", "train_step"]


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the demo's)."""

    steps: int = 1500
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup: int = 100
    lr_drop: float = 0.8
    clip: float = 0.1
    aux_route_weight: float = 0.3
    o2m_k: int = 6
    eval_every: int = 250
    seed: int = 0

    def to_dict(self) -> dict:
        """The settings as a plain dict."""
        return asdict(self)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_model(cfg: ToyDETRConfig, seed: int) -> nn.Module:
    """``build_model(cfg)`` whose modules shared with the baseline start as the baseline's."""
    torch.manual_seed(seed)
    reference = build_model(replace(cfg, routes="baseline"))
    if cfg.routes == "baseline":
        return reference
    torch.manual_seed(seed + 1)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"baseline weights not in {cfg.routes}: {unexpected}")
    return model


def build_criterion(model, train_cfg: TrainConfig) -> MultiRouteCriterion:
    """Hungarian for the primary route, one-to-many (k = ``o2m_k``) for auxiliary routes."""
    matcher = RouteMatcher.for_routes(
        model.route_set, HungarianMatcher(), OneToManyMatcher(k=train_cfg.o2m_k)
    )
    weights = {r.name: train_cfg.aux_route_weight for r in model.route_set[1:]}
    mask_loss = MaskLoss(num_points=1024) if model.cfg.masks else None
    return MultiRouteCriterion(model.cfg.num_classes, matcher, route_weights=weights,
                               mask_loss=mask_loss)  # fmt: skip


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
        return warm * (0.1 if step >= int(cfg.lr_drop * cfg.steps) else 1.0)

    return f


def _route_losses(losses: dict, names) -> dict[str, float]:
    """Unweighted sum of each route's terms (all layers), for the progress bar."""
    out = dict.fromkeys(names, 0.0)
    for key, v in losses.items():
        parts = key.split("/")
        if len(parts) == 3:
            out[parts[1].split(":")[0]] += v.item()
    return out


def _float(x):
    """``x`` (nested dicts / lists of tensors) with floating tensors in float32."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float(v) for v in x)
    return x


def to_device(images: torch.Tensor, targets: list[dict], device) -> tuple:
    """``images`` and every tensor of ``targets`` on ``device``."""
    moved = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True), moved


def train_step(model, criterion, opt, images, targets, clip: float, amp: str | None = None):
    """One optimisation step; returns the criterion's losses. ``amp="bf16"``: the forward pass
    under bfloat16 autocast, the criterion in float32."""
    ctx = nullcontext()
    if amp == "bf16":
        ctx = torch.autocast(images.device.type, dtype=torch.bfloat16)
    try:
        with ctx:
            out = model(images)
        losses = criterion(out if amp is None else _float(out), targets)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
    except (RuntimeError, TypeError) as e:
        if amp is None:
            raise
        raise RuntimeError(
            f"--amp {amp}: the training step failed under bfloat16 autocast ({e}); an op of the "
            "model may not support it yet: run without --amp"
        ) from e
    params = [p for g in opt.param_groups for p in g["params"]]
    nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return losses


def _progress_bar(show: bool, total: int, initial: int, desc):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, mininterval=2.0)


def _eval_line(desc, done: int, stats: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    cells = " ".join(f"{k} {fmt(stats.get(k))}" for k in ("AP", "AP50", "AP75"))
    return f"{desc}: step {done}: {cells}"


def train(
    model_cfg: ToyDETRConfig,
    train_cfg: TrainConfig,
    train_data: DetectionData,
    val_data: DetectionData,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    desc: str | None = None,
    device: str | torch.device = "cpu",
    amp: str | None = None,
):
    """Train one route set; returns ``(model, history)``.

    ``history = {"evals": [{"step", "seconds", **coco stats}], "seconds": training seconds
    (evaluation excluded), "steps": steps done, "losses": [per-step total loss]}``.

    Raises:
        ValueError: ``--resume`` with a model setting that differs from the checkpoint's.
        RuntimeError: an evaluation failed (the checkpoint of that step is kept).
    """
    rank, world = _dist()
    if train_cfg.batch_size % world:
        raise ValueError(
            f"batch_size ({train_cfg.batch_size}) must be divisible by the number "
            f"of processes ({world})"
        )
    run_dir, device = Path(run_dir), torch.device(device)
    model = init_model(model_cfg, train_cfg.seed).to(device)
    criterion = build_criterion(model, train_cfg)
    opt = torch.optim.AdamW(model.parameters(), train_cfg.lr, weight_decay=train_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(train_cfg))
    history = {"evals": [], "seconds": 0.0, "steps": 0, "losses": []}
    ckpt = run_dir / "last.pt"
    if resume and ckpt.is_file():
        history = checkpoint.load(ckpt, model, opt, sched, model_cfg, train_cfg)
    ddp = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    per_proc = train_cfg.batch_size // world
    sampler = DistributedSampler(
        range(len(train_data)), world, rank, shuffle=True, seed=train_cfg.seed, drop_last=True
    )
    per_epoch = len(sampler) // per_proc
    if per_epoch < 1:
        raise ValueError(f"train set of {len(train_data)} images is smaller than one batch")
    bar = _progress_bar(progress and rank == 0, train_cfg.steps, history["steps"], desc)
    names = [r.name for r in model.route_set]
    order, epoch = None, -1
    model.train()
    t_run = time.perf_counter()
    while True:
        done = history["steps"]
        due = done > 0 and (done % train_cfg.eval_every == 0 or done == train_cfg.steps)
        if due and (not history["evals"] or history["evals"][-1]["step"] != done):
            if rank == 0:  # the training so far is saved before the evaluation can fail
                checkpoint.save(ckpt, model, opt, sched, history, model_cfg, train_cfg)
            try:
                stats = evaluate(model, val_data)
            except Exception as e:
                raise RuntimeError(
                    f"{desc}: the evaluation at step {done} failed ({type(e).__name__}: {e}); "
                    f"the training so far is kept in {ckpt}: fix the cause and rerun with "
                    "--resume"
                ) from e
            history["evals"].append({"step": done, "seconds": history["seconds"], **stats})
            if rank == 0:
                (bar.write if bar is not None else print)(_eval_line(desc, done, stats))
                checkpoint.save(ckpt, model, opt, sched, history, model_cfg, train_cfg)
        if done >= train_cfg.steps:
            break
        step = done
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            sampler.set_epoch(epoch)
            order = list(sampler)
        k = step % per_epoch
        idx = order[k * per_proc : (k + 1) * per_proc]
        flips = [np.random.default_rng([train_cfg.seed, step, i]).random() < 0.5 for i in idx]
        images, targets = to_device(*batch(train_data, idx, flips), device)
        t0 = time.perf_counter()
        losses = train_step(ddp, criterion, opt, images, targets, train_cfg.clip, amp)
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        history["seconds"] += time.perf_counter() - t0
        history["steps"] = step + 1
        history["losses"].append(losses["loss"].item())
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"{desc}: loss is {float(losses['loss'])} at step {step}")
        if bar is not None:
            per_route = _route_losses(losses, names)
            rate = history["steps"] / max(history["seconds"], 1e-9)
            bar.set_postfix({n: f"{v:.2f}" for n, v in per_route.items()} | {"it/s": f"{rate:.2f}"})
            bar.update(1)
    if bar is not None:
        bar.close()
    history["wall_seconds"] = time.perf_counter() - t_run
    return model, history
