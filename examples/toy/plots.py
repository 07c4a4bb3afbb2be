"""Figures and the markdown report of the toy demo (matplotlib, Agg backend).

``plot_convergence``: primary-route AP vs step and vs training seconds for every run;
``plot_attention``: Mr. DETR's instructive self-attention map (instruction tokens first);
``plot_detections``: a few val images with each run's boxes; ``write_report``: one sentence on
who won and by how much, then the table.
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
    "write_report",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_convergence(histories: dict[str, dict], path: str | Path) -> None:
    """AP vs step (left) and vs training seconds (right) for ``{run name: history}``."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in histories.items():
        steps = [e["step"] for e in h["evals"]]
        secs = [e["seconds"] for e in h["evals"]]
        ap = [e["AP"] for e in h["evals"]]
        axes[0].plot(steps, ap, "o-", label=name)
        axes[1].plot(secs, ap, "o-", label=name)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training seconds (evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("primary-route COCO AP (val)")
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
        model(images[:1])
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
    im = ax.imshow(attn.sqrt().numpy(), cmap="viridis")
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
        preds = predict(model, images)
        for col, i in enumerate(idx):
            ax = axes[row, col]
            s = data.images[i].shape[0]
            ax.imshow(data.images[i])
            scores, labels, boxes = preds[col]
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


def verdict(results: dict) -> str:
    """One sentence: which run has the higher primary-route AP and by how much."""
    if "baseline" not in results or len(results) < 2:
        name, r = next(iter(results.items()))
        return f"{name} reached AP {r['AP']:.3f} (no comparison run)."
    base = results["baseline"]
    others = {k: v for k, v in results.items() if k != "baseline"}
    name, best = max(others.items(), key=lambda kv: kv[1]["AP"])
    diff = best["AP"] - base["AP"]
    steps = best["steps"]
    if abs(diff) < 0.0005:
        return f"{name} and the baseline tied at AP {base['AP']:.3f} after {steps} steps."
    winner, loser = (name, "the baseline") if diff > 0 else ("The baseline", name)
    w, l = (best, base) if diff > 0 else (base, best)
    return (
        f"{winner} won: primary-route AP {w['AP']:.3f} vs {l['AP']:.3f} for {loser} "
        f"({abs(diff):+.3f} AP, {abs(diff) / max(l['AP'], 1e-9):.0%} relative) after {steps} "
        "equal steps on the same data."
    )


def write_report(results: dict, path: str | Path) -> str:
    """Markdown report: the verdict, a table and the seconds per step; returns the verdict."""
    sentence = verdict(results)
    lines = [
        "# Toy detection: baseline vs Mr. DETR",
        "",
        sentence,
        "",
        "| run | AP | AP50 | AP75 | APs | APm | APl | steps | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        cells = " | ".join("n/a" if r[k] is None else f"{r[k]:.3f}" for k in keys)
        lines.append(f"| {name} | {cells} | {r['steps']} | {r['seconds_per_step']:.3f} |")
    lines += [
        "",
        "Primary route only, pycocotools bbox AP on the val split. Figures: "
        "`convergence.png`, `attention.png`, `detections.png`. n/a: no val box in that COCO "
        "area range. One seed: at the default settings the seed-to-seed spread of AP is about "
        "0.015 (docs/benchmarks.md), so smaller differences are noise.",
        "",
    ]
    Path(path).write_text("\n".join(lines))
    return sentence
