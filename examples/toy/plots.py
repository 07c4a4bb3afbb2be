"""Figures and the markdown report of the toy demo (matplotlib, Agg backend).

``plot_convergence``: primary-route AP vs step and vs training seconds for every run;
``plot_attention``: Mr. DETR's instructive self-attention map (instruction tokens first);
``plot_detections``: a few val images with each run's boxes (the report: ``toy.report``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import DetectionData, batch
from .evaluate import predict

__all__ = [
    "instruction_attention",
    "plot_attention",
    "plot_convergence",
    "plot_detections",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_convergence(
    histories: dict[str, dict], path: str | Path, step_cost: dict[str, float] | None = None,
    device: str = "cpu",
) -> None:  # fmt: skip
    """AP vs step (left) and vs training seconds (right) for ``{run name: history}``.

    ``step_cost`` (``{run name: seconds per step}``, measured interleaved in one process by
    ``toy.cost``) puts every run on one clock: seconds = step x its cost. Without it each run's
    own clock is plotted, and the axis says that it depends on the machine's load.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in histories.items():
        steps = [e["step"] for e in h["evals"]]
        if step_cost is not None:
            secs = [s * step_cost[name] for s in steps]
        else:
            secs = [e["seconds"] for e in h["evals"]]
        ap = [e["AP"] for e in h["evals"]]
        axes[0].plot(steps, ap, "o-", label=name)
        axes[1].plot(secs, ap, "o-", label=name)
    axes[0].set_xlabel("training step")
    if step_cost is not None:
        clock = f"training seconds = steps x step cost\n(interleaved, one process, {device})"
    else:
        clock = "training seconds, each run's own clock\n(depends on the machine's load)"
    axes[1].set_xlabel(clock)
    for ax in axes:
        ax.set_ylabel("primary-route COCO AP (val, 0-1)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def instruction_attention(model, images: torch.Tensor, layer: int = -1) -> torch.Tensor | None:
    """Head-averaged instructive self-attention map of the first route with instruction tokens
    at decoder layer ``layer``: ``Tensor[n+Q, n+Q]`` of image 0 (tokens first), or None when the
    model has no such route."""
    routes = model.route_set
    hit = [i for i, r in enumerate(routes) if r.num_instruction_tokens > 0]
    if not hit:
        return None
    i = hit[0]
    dec_layer = model.decoder.layers[layer]
    captured = {}

    def hook(_module, _args, kwargs):
        captured.update(query=_args[0] if _args else kwargs["query"], pos=kwargs["query_pos"])

    handle = dec_layer.register_forward_pre_hook(hook, with_kwargs=True)
    was = model.training
    model.eval()
    model.decoder.train()  # every route runs; dropout is 0 in the toy model
    try:
        model(images[:1].to(next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was)
    aux = dec_layer.aux[routes[i].name].self_attn
    pos = captured["pos"]
    _, weights = aux(
        captured["query"][i],
        None if pos is None else pos[i],
        need_weights=True,
        projections=aux.attn or dec_layer.self_attn,
    )
    return weights[0].mean(0)  # [n+Q, n+Q]


def plot_attention(model, data: DetectionData, path: str | Path) -> bool:
    """Save the instructive attention map of ``model`` on val image 0; False without tokens."""
    images, _ = batch(data, [0])
    attn = instruction_attention(model, images)
    if attn is None:
        return False
    n = next(r.num_instruction_tokens for r in model.route_set if r.num_instruction_tokens)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    im = ax.imshow(attn.sqrt().float().cpu().numpy(), cmap="viridis")
    ax.axhline(n - 0.5, color="w", lw=0.8)
    ax.axvline(n - 0.5, color="w", lw=0.8)
    ax.set_title(
        f"instructive self-attention (last layer, heads averaged)\nfirst {n} rows/cols: "
        "instruction tokens; colour: sqrt(weight)",
        fontsize=9,
    )
    ax.set_xlabel("key (instruction tokens, then object queries)")
    ax.set_ylabel("query")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_detections(
    models: dict, data: DetectionData, path: str | Path, num: int = 4, threshold: float = 0.3
) -> None:
    """Val images ``0 .. num-1`` (columns) with each model's boxes scoring > ``threshold`` (at
    least its 3 best boxes)."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    names = [c for c in data.coco["categories"]]
    label_name = {i: c["name"] for i, c in enumerate(sorted(names, key=lambda c: c["id"]))}
    idx = list(range(min(num, len(data))))
    images, _ = batch(data, idx)
    fig, axes = plt.subplots(
        len(models), len(idx), figsize=(2.6 * len(idx), 2.8 * len(models)), squeeze=False
    )
    for row, (name, model) in enumerate(models.items()):
        preds = predict(model, images.to(next(model.parameters()).device))
        for col, i in enumerate(idx):
            ax = axes[row, col]
            s = data.images[i].shape[0]
            ax.imshow(data.images[i])
            scores, labels, boxes = (t.cpu() for t in preds[col])
            keep = min(threshold, float(scores[min(2, len(scores) - 1)]))  # at least 3 boxes
            for sc, lab, b in zip(
                scores.tolist(), labels.tolist(), (boxes * s).tolist(), strict=True
            ):
                if sc < keep:
                    continue
                x0, y0 = b[0] - b[2] / 2, b[1] - b[3] / 2
                ax.add_patch(Rectangle((x0, y0), b[2], b[3], fill=False, color="yellow", lw=1))
                ax.text(
                    x0,
                    y0,
                    f"{label_name.get(lab, lab)} {sc:.2f}",
                    fontsize=5,
                    color="black",
                    backgroundcolor="yellow",
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    fig.suptitle(f"val detections (score > {threshold}, at least the 3 best)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
