"""Mr. DETR's training routes on HF transformers' ``DeformableDetrForObjectDetection``.

    python examples/hf_deformable_detr.py [--steps N]

A small random-init two-stage Deformable-DETR with box refinement (a small ``ResNetConfig``
backbone built by transformers: no timm, no torchvision, no download) is wrapped with
``mrdetr.adapters.wrap`` and trained ``N`` steps on one random batch with Mr. DETR's three
routes, through ``RouteMatcher.for_routes`` and ``MultiRouteCriterion`` (loss per route printed
each step). Then it checks, and exits non-zero otherwise, that the wrapped model in ``eval()``
gives outputs bitwise equal to the unwrapped model's, and that ``unwrap`` + ``save_pretrained``
+ ``from_pretrained`` gives a checkpoint with exactly the original keys and the same outputs.
The last line printed is a one-line summary. The lines marked ``# mrdetr`` are all a training
script needs to change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_common import check_and_summarise, log, per_route, steps_bar  # noqa: E402

from mrdetr import MultiRouteCriterion, RouteMatcher, adapters, routes  # noqa: E402
from mrdetr.testing.hf_models import hf_deformable_detr, random_detection_batch  # noqa: E402

CLASSES = 3


def train(steps: int, seed: int = 0, quiet: bool = False):
    """Build, wrap, train ``steps`` steps; returns (wrapped model, original keys, losses)."""
    model = hf_deformable_detr(with_box_refine=True, two_stage=True, num_labels=CLASSES, seed=seed)
    keys = list(model.state_dict())
    route_set = routes.mr_detr(num_instruction_tokens=4)
    adapters.wrap(model, route_set)  # mrdetr
    criterion = MultiRouteCriterion(CLASSES, RouteMatcher.for_routes(route_set))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # after wrap: sees the route params
    pixels, targets = random_detection_batch(num_labels=CLASSES, seed=seed)
    history = []
    for _ in steps_bar(steps, quiet):
        out = model(pixels)  # the primary route's outputs, as before
        extra = adapters.route_outputs(model)  # mrdetr
        outputs = adapters.hf_route_predictions(model, extra, out)  # mrdetr
        losses = criterion(outputs, targets)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append(per_route(losses, criterion, [r.name for r in route_set]))
        if not quiet:
            log("  ".join(f"{k} {v:7.3f}" for k, v in history[-1].items()))
    return model, keys, history


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    model, keys, history = train(args.steps)
    pixels, _ = random_detection_batch(num_labels=CLASSES, seed=1)
    return check_and_summarise(model, keys, history, args.steps, pixels)


if __name__ == "__main__":
    main()
