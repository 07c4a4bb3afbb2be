"""Mr. DETR's training routes on a DETR built around ``torch.nn.TransformerDecoder``.

    python examples/wrap_torch_decoder.py [--steps N]

A small random-init DETR (a linear "encoder" over fixed random features, learned queries,
``nn.TransformerDecoder``, class and box heads) is wrapped with ``mrdetr.adapters.wrap`` and
trained ``N`` steps on one random batch with Mr. DETR's three routes, through
``RouteMatcher.for_routes`` and ``MultiRouteCriterion`` (loss per route printed each step).
Then it checks, and exits non-zero otherwise, that the wrapped model in ``eval()`` gives outputs
bitwise equal to the unwrapped model's, and that ``unwrap`` + ``state_dict`` + a fresh model's
``load_state_dict(strict=True)`` round trip gives the same outputs. The last line printed is a
one-line summary. The lines marked ``# mrdetr`` are all a training script needs to change.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys

import torch
from torch import Tensor, nn

from mrdetr import MultiRouteCriterion, RouteMatcher, adapters, routes

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional
    tqdm = None

FEATURES, TOKENS, DIM, QUERIES, CLASSES = 16, 48, 64, 20, 3


class ToyDETR(nn.Module):
    """Features ``[B, S, F]`` -> ``{"pred_logits": [B, Q, K], "pred_boxes": [B, Q, 4]}``."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Linear(FEATURES, DIM)
        self.query_embed = nn.Embedding(QUERIES, DIM)
        layer = nn.TransformerDecoderLayer(DIM, 4, 128, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(DIM))
        self.class_head = nn.Linear(DIM, CLASSES)
        self.box_head = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, 4))

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        memory = self.encoder(features)  # [B, S, C]
        tgt = self.query_embed.weight.expand(features.shape[0], -1, -1)  # [B, Q, C]
        hs = self.decoder(tgt, memory)  # [B, Q, C]
        return {"pred_logits": self.class_head(hs), "pred_boxes": self.box_head(hs).sigmoid()}


def random_batch(batch: int = 2, seed: int = 0) -> tuple[Tensor, list[dict]]:
    """Fixed random features ``[B, S, F]`` and 1-4 random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, TOKENS, FEATURES, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 5, (1,), generator=g))
        centre, size = (
            0.2 + 0.6 * torch.rand(n, 2, generator=g),
            0.1 + 0.2 * torch.rand(n, 2, generator=g),
        )
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], 1)})
    return features, targets


def train(steps: int, seed: int = 0, quiet: bool = False) -> tuple[ToyDETR, list[dict[str, float]]]:
    """Wrap, train ``steps`` steps; returns the (still wrapped) model and per-route losses."""
    torch.manual_seed(seed)
    model = ToyDETR()
    route_set = routes.mr_detr(num_instruction_tokens=4)
    adapters.wrap(model, route_set)  # mrdetr
    criterion = MultiRouteCriterion(CLASSES, RouteMatcher.for_routes(route_set))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # after wrap: sees the route params
    features, targets = random_batch()
    history = []
    bar = range(steps) if tqdm is None or quiet else tqdm(range(steps), file=sys.stdout)
    for _ in bar:
        model(features)  # primary outputs as before (unused here: the routes cover every layer)
        extra = adapters.route_outputs(model)  # mrdetr
        outputs = adapters.route_predictions(extra, model.class_head, model.box_head)  # mrdetr
        losses = criterion(outputs, targets)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        per_route = {r.name: 0.0 for r in route_set}
        for key, value in losses.items():
            if key != "loss":
                term, tag = key.split("/")[:2]
                per_route[tag.split(":")[0]] += criterion.term_weights[term] * value.item()
        history.append(per_route)
        if not quiet:
            line = "  ".join(f"{k} {v:7.3f}" for k, v in per_route.items())
            print(line) if tqdm is None else tqdm.write(line, file=sys.stdout)
    return model, history


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    model, history = train(args.steps)
    features, _ = random_batch()
    model.eval()
    plain = adapters.unwrap(copy.deepcopy(model))
    with torch.no_grad():
        wrapped_out, plain_out = model(features), plain(features)
    eval_equal = all(torch.equal(wrapped_out[k], plain_out[k]) for k in wrapped_out)

    adapters.unwrap(model)  # mrdetr: a plain checkpoint again
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = ToyDETR()
    fresh.load_state_dict(torch.load(buf), strict=True)
    fresh.eval()
    with torch.no_grad():
        reload_equal = all(torch.equal(fresh(features)[k], plain_out[k]) for k in plain_out)

    first, last = history[0], history[-1]
    summary = dict(eval_equal=eval_equal, reload_equal=reload_equal, first=first, last=last)
    print(
        f"steps {args.steps}: primary loss {first['primary']:.3f} -> {last['primary']:.3f}, "
        f"eval == unwrapped: {eval_equal}, unwrap + reload == unwrapped: {reload_equal}"
    )
    if not (eval_equal and reload_equal):
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
