"""Matcher benchmark: mrdetr's matchers against plain baselines, timed in the same run.

Baselines, written here from the published descriptions:
- DETR's batched matcher: one ``[B*Q, sum N]`` cost matrix, split per image for scipy.
- DETR's matcher called once per image: the same costs on ``[Q, N_b]``, image by image.
- a straightforward per-image implementation of the five one-to-many rules (loop over gts).

- H-DETR's repeated-gt matching done plainly: the gts repeated ``k`` times, DETR per image.

Run: ``python benchmarks/matchers.py [--batch 16 --queries 900 --gts 30 --classes 91 --reps 30]``.
Prints medians (ms) over ``--reps`` repetitions after warm-up, speed-up ratios, and the scratch
memory each matcher keeps between calls.

``--memory``: only the pair check and the scratch memory each matcher keeps (e.g. at H-DETR-like
sizes: ``--batch 2 --queries 5000 --gts 1000 --memory``).

``--contended``: start a process that keeps one core busy (a Python busy loop, like another
user's job on a shared machine), repeat the timings ``--runs`` times and print the ratios of every
run, with ``HungarianMatcher`` also timed with torch's intra-op threads (the matchers' one-thread
rule switched off, i.e. the behaviour before it) for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time

import torch
from scipy.optimize import linear_sum_assignment

from mrdetr.matching import HungarianMatcher, OneToManyMatcher, RepeatedGTMatcher

try:  # absent before the matchers' base existed (timing an older checkout via PYTHONPATH)
    from mrdetr.matching import base as matching_base
except ImportError:
    matching_base = None

# ----------------------------------------------------------------------------- baselines


def _xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _area(b):
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def _iou_plain(a, b):
    area_a, area_b = _area(a), _area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union, union


def _giou_plain(a, b):
    iou, union = _iou_plain(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enc = wh[..., 0] * wh[..., 1]
    return iou - (enc - union) / enc


def _focal_cost_plain(prob, ids, alpha=0.25, gamma=2.0):
    neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos[:, ids] - neg[:, ids]


@torch.no_grad()
def detr_batched(outputs, targets):
    """DETR / Deformable-DETR matcher: the whole [B*Q, sum N] cost matrix."""
    bs, nq = outputs["pred_logits"].shape[:2]
    prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
    out_bbox = outputs["pred_boxes"].flatten(0, 1)
    ids = torch.cat([t["labels"] for t in targets])
    tgt = torch.cat([t["boxes"] for t in targets])
    c = (
        5.0 * torch.cdist(out_bbox, tgt, p=1)
        + 2.0 * _focal_cost_plain(prob, ids)
        - 2.0 * _giou_plain(_xyxy(out_bbox), _xyxy(tgt))
    )
    c = c.view(bs, nq, -1).cpu()
    sizes = [len(t["boxes"]) for t in targets]
    idx = [linear_sum_assignment(m[i]) for i, m in enumerate(c.split(sizes, -1))]
    return [
        (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
        for i, j in idx
    ]


@torch.no_grad()
def detr_per_image(outputs, targets):
    """The same costs, computed and solved one image at a time."""
    out = []
    for b, t in enumerate(targets):
        prob = outputs["pred_logits"][b].sigmoid()
        pb = outputs["pred_boxes"][b]
        c = (
            5.0 * torch.cdist(pb, t["boxes"], p=1)
            + 2.0 * _focal_cost_plain(prob, t["labels"])
            - 2.0 * _giou_plain(_xyxy(pb), _xyxy(t["boxes"]))
        )
        i, j = linear_sum_assignment(c.cpu())
        out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
    return out


@torch.no_grad()
def repeated_per_image(outputs, targets, k=6):
    """H-DETR: each image's gts repeated k times, then DETR's matcher image by image."""
    rep = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
    out = detr_per_image(outputs, rep)
    return [(p, g % max(len(t["labels"]), 1)) for (p, g), t in zip(out, targets, strict=True)]


@torch.no_grad()
def o2m_per_image(outputs, targets, k=6, thr=0.4, wi=0.7, wc=0.3):
    """The five one-to-many rules, image by image, gt by gt."""
    out = []
    for b, t in enumerate(targets):
        n = len(t["labels"])
        if n == 0:
            e = torch.zeros(0, dtype=torch.int64)
            out.append((e, e))
            continue
        iou, _ = _iou_plain(_xyxy(outputs["pred_boxes"][b]), _xyxy(t["boxes"]))
        prob = outputs["pred_logits"][b].sigmoid()[:, t["labels"]]
        quality = wi * iou + wc * prob
        best_q, best_g = quality.max(1)
        pos = best_q >= thr
        pos[quality.argmax(0)] = True
        count = torch.bincount(best_g[pos], minlength=n)
        preds, gts = [], []
        for g in range(n):
            c = min(int(count[g]), k)
            if c > 0:
                preds.append(quality[:, g].topk(c).indices)
                gts.append(torch.full((c,), g, dtype=torch.int64))
        out.append((torch.cat(preds), torch.cat(gts)))
    return out


# ----------------------------------------------------------------------------- harness


def make_inputs(batch, queries, gts, classes, seed=0):
    """Predictions clustered around the gts (half the queries jitter a gt), as after training."""
    g = torch.Generator().manual_seed(seed)
    targets, boxes = [], []
    for _ in range(batch):
        c = torch.rand(gts, 2, generator=g) * 0.8 + 0.1
        wh = torch.rand(gts, 2, generator=g) * 0.25 + 0.05
        tb = torch.cat([c, wh], -1)
        targets.append({"labels": torch.randint(classes, (gts,), generator=g), "boxes": tb})
        pb = torch.rand(queries, 4, generator=g) * 0.5 + 0.1
        near = queries // 2
        if gts:
            src = tb[torch.randint(gts, (near,), generator=g)]
            pb[:near] = src * (1 + 0.15 * torch.randn(near, 4, generator=g))
        boxes.append(pb.clamp(0.01, 0.99))
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes, generator=g) - 2.0,
        "pred_boxes": torch.stack(boxes),
    }
    return outputs, targets


def _busy_ticks():
    """Busy CPU time of the whole machine, in seconds (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def median_ms(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _same_pairs(a, b):
    return all(
        sorted(zip(p.tolist(), g.tolist(), strict=True))
        == sorted(zip(p2.tolist(), g2.tolist(), strict=True))
        for (p, g), (p2, g2) in zip(a, b, strict=True)
    )


@contextlib.contextmanager
def intra_op_threads():
    """Switch the matchers' one-thread rule off (the behaviour before it), for comparison."""
    saved = matching_base.single_thread
    matching_base.single_thread = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        matching_base.single_thread = saved


def time_rows(outputs, targets, matchers, reps, warmup, with_threads_row=False):
    hung, o2m, rep = matchers
    fns = {
        "HungarianMatcher": lambda: hung(outputs, targets),
        "DETR batched": lambda: detr_batched(outputs, targets),
        "DETR per image": lambda: detr_per_image(outputs, targets),
        "OneToManyMatcher": lambda: o2m(outputs, targets),
        "o2m per image": lambda: o2m_per_image(outputs, targets),
        "RepeatedGTMatcher": lambda: rep(outputs, targets),
        "repeated per image": lambda: repeated_per_image(outputs, targets),
    }
    rows = {name: median_ms(fn, reps, warmup) for name, fn in fns.items()}
    if with_threads_row and matching_base is not None:
        with intra_op_threads():
            rows["Hungarian, threads"] = median_ms(fns["HungarianMatcher"], reps, warmup)
    return rows


def kept_mib(matcher):
    """Scratch memory the matcher keeps between calls (read from its workspace's store)."""
    store = matcher._workspace._local.__dict__.get("store", {})
    return sum(t.numel() * t.element_size() for t in store.values()) / 2**20


def print_ratios(rows):
    h, o, r = rows["HungarianMatcher"], rows["OneToManyMatcher"], rows["RepeatedGTMatcher"]
    print(f"Hungarian vs DETR batched:   {rows['DETR batched'] / h:5.2f}x faster (target >= 5)")
    print(f"Hungarian vs DETR per image: {rows['DETR per image'] / h:5.2f}x faster (target >= 1.2)")
    print(f"OneToMany vs per image:      {rows['o2m per image'] / o:5.2f}x faster (target >= 3)")
    print(f"RepeatedGT vs per image:     {rows['repeated per image'] / r:5.2f}x faster")
    if "Hungarian, threads" in rows:
        t = rows["DETR per image"] / rows["Hungarian, threads"]
        print(f"Hungarian with intra-op threads vs DETR per image: {t:5.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--queries", type=int, default=900)
    ap.add_argument("--gts", type=int, default=30)
    ap.add_argument("--classes", type=int, default=91)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contended", action="store_true", help="time beside a busy-loop process")
    ap.add_argument(
        "--memory", action="store_true", help="stop after the pair check and the memory figures"
    )
    ap.add_argument("--runs", type=int, default=10, help="repetitions with --contended")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    outputs, targets = make_inputs(args.batch, args.queries, args.gts, args.classes)
    matchers = HungarianMatcher(), OneToManyMatcher(), RepeatedGTMatcher(k=6)
    hung, o2m, rep = matchers

    # sanity: same assignments as the baselines (ties aside, random inputs have none)
    ok_h = _same_pairs(hung(outputs, targets), detr_batched(outputs, targets))
    ok_o = _same_pairs(o2m(outputs, targets), o2m_per_image(outputs, targets))
    ok_r = _same_pairs(rep(outputs, targets), repeated_per_image(outputs, targets))
    print(
        f"B={args.batch} Q={args.queries} gts={args.gts} K={args.classes} "
        f"threads={torch.get_num_threads()} reps={args.reps} torch={torch.__version__}"
    )
    print(f"same pairs as baselines: hungarian={ok_h} one_to_many={ok_o} repeated_gt={ok_r}")
    kept = {type(m).__name__: kept_mib(m) for m in matchers}
    print("scratch kept between calls (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in kept.items()))
    if args.memory:
        return

    if args.contended:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        # a SIGTERM (e.g. from `timeout`) must still stop the busy loop: turn it into SystemExit
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            time.sleep(0.5)
            print(f"busy-loop process {busy.pid} running; {args.runs} runs")
            summary = []
            for run in range(args.runs):
                rows = time_rows(outputs, targets, matchers, args.reps, args.warmup, True)
                per_image = rows["DETR per image"]
                ratio = per_image / rows["HungarianMatcher"]
                threaded = per_image / rows.get("Hungarian, threads", float("nan"))
                o2m_ratio = rows["o2m per image"] / rows["OneToManyMatcher"]
                summary.append((ratio, threaded, o2m_ratio))
                print(
                    f"run {run}: Hungarian {rows['HungarianMatcher']:.2f} ms, with threads "
                    f"{rows.get('Hungarian, threads', float('nan')):.2f} ms, DETR per image "
                    f"{per_image:.2f} ms -> "
                    f"{ratio:.2f}x (threads: {threaded:.2f}x); one-to-many {o2m_ratio:.2f}x"
                )
        finally:
            busy.kill()
            busy.wait()
        names = ("Hungarian", "Hungarian with threads", "one-to-many")
        for name, col in zip(names, zip(*summary, strict=True), strict=True):
            print(
                f"{name} vs per image over {args.runs} runs: min {min(col):.2f}x, median "
                f"{statistics.median(col):.2f}x, max {max(col):.2f}x, runs below 1x: "
                f"{sum(c < 1 for c in col)}"
            )
        return

    busy0, own0, wall0 = _busy_ticks(), sum(os.times()[:2]), time.perf_counter()
    rows = time_rows(outputs, targets, matchers, args.reps, args.warmup)
    busy1, own1, wall1 = _busy_ticks(), sum(os.times()[:2]), time.perf_counter()
    if busy0 is not None:
        other = (busy1 - busy0 - (own1 - own0)) / (wall1 - wall0)
        print(f"other processes used {other:.2f} of {os.cpu_count()} cores during the timings")
    for name, ms in rows.items():
        print(f"{name:>18}: {ms:8.2f} ms")
    print_ratios(rows)


if __name__ == "__main__":
    main()
