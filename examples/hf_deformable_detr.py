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
import copy
import sys
import tempfile

import torch

from mrdetr import MultiRouteCriterion, RouteMatcher, adapters, routes
from mrdetr.adapters.hf_models import hf_deformable_detr, random_detection_batch

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional
    tqdm = None

CLASSES = 3


def per_route(losses: dict, criterion: MultiRouteCriterion, names) -> dict[str, float]:
    """Weighted loss of every route (all its layers and terms) from the criterion's dict."""
    total = {name: 0.0 for name in names}
    for key, value in losses.items():
        if key != "loss":
            term, tag = key.split("/")[:2]
            total[tag.split(":")[0]] += criterion.term_weights[term] * value.item()
    return total


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
    bar = range(steps) if tqdm is None or quiet else tqdm(range(steps), file=sys.stdout)
    for _ in bar:
        out = model(pixels)  # the primary route's outputs, as before
        extra = adapters.route_outputs(model)  # mrdetr
        outputs = adapters.hf_route_predictions(model, extra, out)  # mrdetr
        losses = criterion(outputs, targets)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append(per_route(losses, criterion, [r.name for r in route_set]))
        if not quiet:
            line = "  ".join(f"{k} {v:7.3f}" for k, v in history[-1].items())
            print(line) if tqdm is None else tqdm.write(line, file=sys.stdout)
    return model, keys, history


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    model, keys, history = train(args.steps)
    pixels, _ = random_detection_batch(num_labels=CLASSES, seed=1)

    model.eval()
    plain = adapters.unwrap(copy.deepcopy(model))
    with torch.no_grad():
        wrapped_out, plain_out = model(pixels), plain(pixels)
    eval_equal = all(
        torch.equal(getattr(wrapped_out, k), getattr(plain_out, k))
        for k in ("logits", "pred_boxes")
    )

    adapters.unwrap(model)  # mrdetr: a plain HF checkpoint again
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = type(model).from_pretrained(tmp).eval()
    keys_equal = list(loaded.state_dict()) == keys
    with torch.no_grad():
        out = loaded(pixels)
    reload_equal = all(
        torch.equal(getattr(out, k), getattr(plain_out, k)) for k in ("logits", "pred_boxes")
    )

    first, last = history[0], history[-1]
    summary = dict(eval_equal=eval_equal, keys_equal=keys_equal, reload_equal=reload_equal,
                   first=first, last=last)  # fmt: skip
    print(
        f"steps {args.steps}: primary loss {first['primary']:.3f} -> {last['primary']:.3f}, "
        f"eval == unwrapped: {eval_equal}, save/from_pretrained keys == original: {keys_equal}, "
        f"outputs == unwrapped: {reload_equal}"
    )
    if not (eval_equal and keys_equal and reload_equal):
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
