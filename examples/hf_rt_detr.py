"""Mr. DETR's training routes on HF transformers' ``RTDetrForObjectDetection``, denoising on.

    python examples/hf_rt_detr.py [--steps N]

A small random-init RT-DETR (a small ``ResNetConfig`` backbone built by transformers: no timm,
no torchvision, no download) with contrastive denoising queries is wrapped with
``mrdetr.adapters.wrap`` and trained ``N`` steps on one random batch. The primary route keeps
transformers' own loss (``labels=``: matching, denoising and encoder terms; the denoising
queries run in the primary route only); the wrapped model's ``loss`` adds the two auxiliary
routes' losses, computed by RT-DETR's own loss function with mrdetr's one-to-many matcher, so
the training loop is unchanged. The loss of every route (its unweighted terms from
``loss_dict``) is printed each step.
Then it checks, and exits non-zero otherwise, that the wrapped model in ``eval()`` gives outputs
bitwise equal to the unwrapped model's, and that ``unwrap`` + ``save_pretrained`` +
``from_pretrained`` gives a checkpoint with exactly the original keys and the same outputs.
The last line printed is a one-line summary; the lines marked ``# mrdetr`` are the change to a
training script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_common import check_and_summarise, log, steps_bar  # noqa: E402

from mrdetr import adapters, routes  # noqa: E402
from mrdetr.testing.hf_models import hf_rt_detr, random_detection_batch  # noqa: E402

CLASSES = 3


def train(steps: int, seed: int = 0, quiet: bool = False):
    """Build, wrap, train ``steps`` steps; returns (wrapped model, original keys, losses)."""
    model = hf_rt_detr(num_labels=CLASSES, num_denoising=8, seed=seed)
    keys = list(model.state_dict())
    route_set = routes.mr_detr(num_instruction_tokens=4)
    adapters.wrap(model, route_set)  # mrdetr: the only change to the training script
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # after wrap: sees the route params
    pixels, targets = random_detection_batch(num_labels=CLASSES, seed=seed)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    history = []
    for _ in steps_bar(steps, quiet):
        out = model(pixels, labels=labels)  # every route's loss, denoising on in the primary
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append(_per_route(out.loss_dict, [r.name for r in route_set]))
        if not quiet:
            log("  ".join(f"{k} {v:7.3f}" for k, v in history[-1].items()))
    return model, keys, history


def _per_route(loss_dict: dict, names: list[str]) -> dict[str, float]:
    """Sum of each route's unweighted terms (``"{route}/{term}"``; unprefixed: the primary)."""
    total = dict.fromkeys(names, 0.0)
    for key, value in loss_dict.items():
        route = key.split("/")[0] if "/" in key else names[0]
        total[route] += float(value.detach())
    return total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    model, keys, history = train(args.steps)
    pixels, _ = random_detection_batch(num_labels=CLASSES, seed=1)
    return check_and_summarise(model, keys, history, args.steps, pixels)


if __name__ == "__main__":
    main()
