"""What examples/hf_deformable_detr.py and examples/hf_rt_detr.py share: the progress bar, the
per-route loss line, and the closing checks (eval equals the unwrapped model; ``unwrap`` +
``save_pretrained`` + ``from_pretrained`` keeps the original keys and outputs)."""

from __future__ import annotations

import copy
import sys
import tempfile

import torch

from mrdetr import MultiRouteCriterion, adapters

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional
    tqdm = None

FIELDS = ("logits", "pred_boxes")


def steps_bar(steps: int, quiet: bool):
    """``range(steps)``, behind a tqdm bar unless ``quiet`` or tqdm is missing."""
    return range(steps) if tqdm is None or quiet else tqdm(range(steps), file=sys.stdout)


def log(line: str) -> None:
    """Print ``line`` without breaking the progress bar."""
    print(line) if tqdm is None else tqdm.write(line, file=sys.stdout)


def per_route(losses: dict, criterion: MultiRouteCriterion, names) -> dict[str, float]:
    """Weighted loss of every route (all its layers and terms) from the criterion's dict."""
    total = {name: 0.0 for name in names}
    for key, value in losses.items():
        if key != "loss":
            term, tag = key.split("/")[:2]
            total[tag.split(":")[0]] += criterion.term_weights[term] * value.item()
    return total


def _equal(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in FIELDS)


def save_pretrained(model, folder: str) -> None:
    """``model.save_pretrained(folder)``; transformers 4.57 cannot write a box-refining
    Deformable-DETR as safetensors (its box heads are shared between the detector and its
    decoder, wrapped or not), so there it falls back to its PyTorch format, as 4.57 users do."""
    try:
        model.save_pretrained(folder)
    except RuntimeError as err:
        if "shared tensors" not in str(err):
            raise
        model.save_pretrained(folder, safe_serialization=False)


def check_and_summarise(model, keys: list[str], history: list[dict], steps: int, pixels) -> dict:
    """Check the wrapped ``model`` against its unwrapped self on ``pixels (Tensor[B, 3, H, W])``,
    unwrap it, round-trip it through ``save_pretrained``/``from_pretrained`` (``keys``: the
    original state-dict keys), print the one-line summary and exit 1 on any mismatch."""
    model.eval()
    plain = adapters.unwrap(copy.deepcopy(model))
    with torch.no_grad():
        wrapped_out, plain_out = model(pixels), plain(pixels)
    eval_equal = _equal(wrapped_out, plain_out)

    adapters.unwrap(model)  # mrdetr: a plain HF checkpoint again
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        loaded = type(model).from_pretrained(tmp).eval()
    keys_equal = list(loaded.state_dict()) == keys
    with torch.no_grad():
        reload_equal = _equal(loaded(pixels), plain_out)

    first, last = history[0], history[-1]
    summary = dict(eval_equal=eval_equal, keys_equal=keys_equal, reload_equal=reload_equal,
                   first=first, last=last)  # fmt: skip
    print(
        f"steps {steps}: primary loss {first['primary']:.3f} -> {last['primary']:.3f}, "
        f"eval == unwrapped: {eval_equal}, save/from_pretrained keys == original: {keys_equal}, "
        f"outputs == unwrapped: {reload_equal}"
    )
    if not (eval_equal and keys_equal and reload_equal):
        sys.exit(1)
    return summary
