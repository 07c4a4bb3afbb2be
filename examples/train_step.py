"""Mr. DETR's pieces wired together: multi-route decoder, heads, route matchers, criterion.

    python examples/train_step.py            # overfits one random batch, prints the losses

A toy detection head on a fixed random "encoder memory": learned queries and reference boxes,
a 2-layer ``MultiRouteDecoder`` with Mr. DETR's three routes and iterative box refinement,
per-layer class and box heads shared by the routes, ``RouteMatcher.for_routes`` (Hungarian for
the primary route, one-to-many for the auxiliary ones) and ``MultiRouteCriterion``. After
training, ``eval()`` runs the primary route only and ``strip_auxiliary()`` leaves a plain
decoder whose weights load into a ``routes.baseline()`` one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mrdetr import MultiRouteCriterion, MultiRouteDecoder, RouteMatcher, routes
from mrdetr.layers import inverse_sigmoid

LEVELS = ((16, 16), (8, 8))


class ToyDetector(nn.Module):
    """Queries + multi-route decoder + heads over a given encoder memory ``[B, S, C]``."""

    def __init__(self, num_classes=3, dim=64, num_queries=20, num_layers=2, route_set=None):
        super().__init__()
        self.route_set = route_set or routes.mr_detr(num_instruction_tokens=4)
        self.query = nn.Parameter(torch.randn(num_queries, dim) * 0.1)
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim) * 0.1)
        self.ref_logits = nn.Parameter(torch.randn(num_queries, 4) * 0.5 - 1.0)
        self.decoder = MultiRouteDecoder(
            num_layers, embed_dim=dim, num_heads=4, ffn_dim=128, num_levels=len(LEVELS),
            num_points=2, dropout=0.0, routes=self.route_set,
        )  # fmt: skip
        self.class_heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_layers))
        self.box_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4))
            for _ in range(num_layers)
        )

    def forward(self, memory: Tensor, shapes: Tensor, starts: Tensor) -> dict:
        """``memory (Tensor[B, S, C])`` -> ``{route: {"pred_logits", "pred_boxes",
        "aux_outputs"}}`` (every route in training, the primary one in eval)."""
        r = len(self.route_set) if self.training else 1
        b = memory.shape[0]
        expand = (r, b, *self.query.shape)
        out = self.decoder(
            self.query.expand(expand),
            query_pos=self.query_pos.expand(expand),
            reference_points=self.ref_logits.sigmoid().expand(r, b, -1, -1),
            value=memory,
            spatial_shapes=shapes,
            level_start_index=starts,
            box_heads=self.box_heads,
        )
        outputs = {}
        for i, route in enumerate(self.route_set[:r]):
            layers = []
            pairs = zip(out.hidden_states, out.reference_points, strict=True)  # per layer
            for l, (hidden, ref) in enumerate(pairs):
                boxes = self.box_heads[l](hidden[i]) + inverse_sigmoid(ref[i])
                layers.append(
                    {"pred_logits": self.class_heads[l](hidden[i]), "pred_boxes": boxes.sigmoid()}
                )
            outputs[route.name] = {**layers[-1], "aux_outputs": layers[:-1]}
        return outputs


def random_batch(batch=2, dim=64, seed=0):
    """A fixed random memory ``[B, S, C]`` and 1-4 random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    memory = torch.randn(batch, int(shapes.prod(1).sum()), dim, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 5, (1,), generator=g))
        centre = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
        size = 0.1 + 0.2 * torch.rand(n, 2, generator=g)
        labels = torch.randint(0, 3, (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], 1)})
    return memory, shapes, starts, targets


def plain_decoder() -> MultiRouteDecoder:
    """The decoder of :class:`ToyDetector` with ``routes.baseline()``: what deployment keeps."""
    return MultiRouteDecoder(
        2, embed_dim=64, num_heads=4, ffn_dim=128, num_levels=len(LEVELS), num_points=2,
        dropout=0.0, routes=routes.baseline(),
    )  # fmt: skip


def train(steps: int = 60, seed: int = 0) -> tuple[ToyDetector, list[float], list[float]]:
    """Overfit one batch; return the model, the total losses and the primary route's losses."""
    torch.manual_seed(seed)
    model = ToyDetector()
    criterion = MultiRouteCriterion(num_classes=3, matcher=RouteMatcher.for_routes(model.route_set))
    memory, shapes, starts, targets = random_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals, primary = [], []
    for _ in range(steps):
        losses = criterion(model(memory, shapes, starts), targets)
        opt.zero_grad()
        losses["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        totals.append(losses["loss"].item())
        primary.append(sum(v.item() for k, v in losses.items() if "/primary/" in k))
    return model, totals, primary


def main() -> None:
    model, totals, primary = train()
    for step in (0, len(totals) // 2, len(totals) - 1):
        print(f"step {step:3d}: loss {totals[step]:7.3f}  (primary route {primary[step]:6.3f})")
    model.eval()
    memory, shapes, starts, _ = random_batch()
    with torch.no_grad():
        print("eval routes:", list(model(memory, shapes, starts)))  # ['primary']
    model.decoder.strip_auxiliary()
    plain_decoder().load_state_dict(model.decoder.state_dict())
    print("stripped decoder loads into a routes.baseline() decoder")


if __name__ == "__main__":
    main()
