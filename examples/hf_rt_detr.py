"""Mr. DETR's training routes on HF transformers' ``RTDetrForObjectDetection``, denoising on.

    python examples/hf_rt_detr.py [--steps N]

A small random-init RT-DETR (a small ``ResNetConfig`` backbone built by transformers: no timm,
no torchvision, no download) with contrastive denoising queries is wrapped with
``mrdetr.adapters.wrap`` and trained ``N`` steps on one random batch. The primary route keeps
transformers' own loss (``labels=``: matching, denoising and encoder terms; the denoising
queries run in the primary route only); ``MultiRouteCriterion`` adds the two auxiliary routes'
one-to-many losses (``RouteMatcher.for_routes``). The loss of every route is printed each step.
Then it checks, and exits non-zero otherwise, that the wrapped model in ``eval()`` gives outputs
bitwise equal to the unwrapped model's, and that ``unwrap`` + ``save_pretrained`` +
``from_pretrained`` gives a checkpoint with exactly the original keys and the same outputs.
The last line printed is a one-line summary; the lines marked ``# mrdetr`` are the change to a
training script.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile

import torch

from mrdetr import MultiRouteCriterion, RouteMatcher, adapters, routes
from mrdetr.adapters.hf_models import hf_rt_detr, random_detection_batch

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
    model = hf_rt_detr(num_labels=CLASSES, num_denoising=8, seed=seed)
    keys = list(model.state_dict())
    route_set = routes.mr_detr(num_instruction_tokens=4)
    adapters.wrap(model, route_set)  # mrdetr
    criterion = MultiRouteCriterion(CLASSES, RouteMatcher.for_routes(route_set))  # mrdetr
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # after wrap: sees the route params
    pixels, targets = random_detection_batch(num_labels=CLASSES, seed=seed)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    history = []
    bar = range(steps) if tqdm is None or quiet else tqdm(range(steps), file=sys.stdout)
    for _ in bar:
        out = model(pixels, labels=labels)  # primary route: transformers' loss, denoising on
        extra = adapters.route_outputs(model)  # mrdetr
        outputs = adapters.hf_route_predictions(model, extra)  # mrdetr
        aux = criterion({k: v for k, v in outputs.items() if k != "primary"}, targets)  # mrdetr
        loss = out.loss + aux["loss"]  # mrdetr
        opt.zero_grad()
        loss.backward()
        opt.step()
        names = [r.name for r in route_set[1:]]
        history.append({"primary": out.loss.item(), **per_route(aux, criterion, names)})
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
    fields = ("logits", "pred_boxes")
    eval_equal = all(torch.equal(getattr(wrapped_out, k), getattr(plain_out, k)) for k in fields)

    adapters.unwrap(model)  # mrdetr: a plain HF checkpoint again
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = type(model).from_pretrained(tmp).eval()
    keys_equal = list(loaded.state_dict()) == keys
    with torch.no_grad():
        out = loaded(pixels)
    reload_equal = all(torch.equal(getattr(out, k), getattr(plain_out, k)) for k in fields)

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
