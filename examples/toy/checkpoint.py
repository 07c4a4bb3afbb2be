"""Checkpoints of the toy demo's runs: atomic save, and a resume that refuses a changed model.

``save(path, model, opt, sched, history, model_cfg, train_cfg)`` writes ``path`` atomically;
``load(path, model, opt, sched, model_cfg, train_cfg)`` restores a run and returns its history.
A model setting that differs from the checkpoint's raises ``ValueError`` naming the option; a
changed learning rate or weight decay is applied to the restored optimizer and schedule (the
checkpoint then records the new value, as it records every other setting of the run).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["OPTION_OF", "load", "save"]

OPTION_OF = {
    "num_queries": "--num-queries",
    "dim": "--dim",
    "two_stage": "--two-stage / --no-two-stage",
    "masks": "--masks",
    "routes": "--routes",
    "num_classes": "the number of categories of the training data",
}
"""Command-line option behind each ``ToyDETRConfig`` field (others: the preset, ``--quick``)."""


def save(path: Path, model, opt, sched, history: dict, model_cfg, train_cfg) -> None:
    """Write the run's state to ``path`` (via a temporary file, so a kill never truncates it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "history": history,
        "model_cfg": model_cfg.to_dict(),
        "train_cfg": train_cfg.to_dict(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _check_model(saved: dict, current: dict, path: Path) -> None:
    for key, value in current.items():
        if key in saved and saved[key] != value:
            option = OPTION_OF.get(key, f"{key} (set by --quick or the preset)")
            raise ValueError(
                f"--resume: {path} was trained with {key}={saved[key]!r} but this run has "
                f"{key}={value!r} ({option}); resume with the checkpoint's value or use another "
                "--out"
            )


def load(path: Path, model, opt, sched, model_cfg, train_cfg) -> dict:
    """Restore ``model``, ``opt`` and ``sched`` from ``path``; returns the saved history.

    Raises:
        ValueError: a model setting differs from the checkpoint's (names the option).
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    _check_model(state.get("model_cfg", {}), model_cfg.to_dict(), path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    saved = state.get("train_cfg", {})
    if saved.get("lr") != train_cfg.lr or saved.get("weight_decay") != train_cfg.weight_decay:
        # the schedule multiplies base_lrs by its factor: restart it from the new rate
        sched.base_lrs = [train_cfg.lr] * len(opt.param_groups)
        factor = sched.lr_lambdas[0](sched.last_epoch)
        for group in opt.param_groups:
            group["initial_lr"] = train_cfg.lr
            group["lr"] = train_cfg.lr * factor
            group["weight_decay"] = train_cfg.weight_decay
        print(
            f"--resume: {path}: lr {saved.get('lr')} -> {train_cfg.lr}, weight decay "
            f"{saved.get('weight_decay')} -> {train_cfg.weight_decay} from step "
            f"{state['history']['steps']} on"
        )
    return state["history"]
