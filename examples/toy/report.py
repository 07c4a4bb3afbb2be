"""The toy demo's ``report.md`` and summary line. Every AP is COCO's 0-1 scale, 3 decimals.

``summary(runs, quick)``: with ``--quick`` the sentence that the run is a smoke test of the
pipeline (too short to compare methods, no winner named); otherwise who won at equal steps and by
how much. ``equal_time_lines(...)``: the step costs measured interleaved in one process
(``toy.cost``) and, when the baseline was also trained for the steps that Mr. DETR's time buys,
the comparison at equal training time. ``write_report(...)`` writes it all with the table.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SMOKE", "equal_time_lines", "summary", "verdict", "write_report"]

SMOKE = (
    "Smoke test of the pipeline (--quick, {steps} steps): it shows that data, training, "
    "evaluation and the outputs work; {steps} steps are far too short to compare methods, so "
    "the APs below say nothing about which is better. `make demo` runs the comparison."
)


def verdict(results: dict) -> str:
    """One sentence: which run has the higher primary-route AP at equal steps, by how much."""
    if "baseline" not in results or len(results) < 2:
        name, r = next(iter(results.items()))
        return f"{name} reached AP {r['AP']:.3f} (no comparison run)."
    base = results["baseline"]
    others = {k: v for k, v in results.items() if k != "baseline"}
    name, best = max(others.items(), key=lambda kv: kv[1]["AP"])
    diff = best["AP"] - base["AP"]
    steps = best["steps"]
    if abs(diff) < 0.0005:
        return f"{name} and the baseline tied at AP {base['AP']:.3f} after {steps} equal steps."
    winner, loser = (name, "the baseline") if diff > 0 else ("The baseline", name)
    w, l = (best, base) if diff > 0 else (base, best)
    return (
        f"{winner} won at equal steps: primary-route AP {w['AP']:.3f} vs {l['AP']:.3f} for "
        f"{loser} ({abs(diff):+.3f} AP, {abs(diff) / max(l['AP'], 1e-9):.0%} relative) after "
        f"{steps} steps on the same data."
    )


def summary(results: dict, quick: bool) -> str:
    """The report's first sentence (and the line the demo prints)."""
    if quick:
        return SMOKE.format(steps=max(r["steps"] for r in results.values()))
    return verdict(results)


def equal_time_lines(cost: dict | None, equal_time: dict | None, results: dict) -> list[str]:
    """Markdown lines on step cost (``cost = {"device", "seconds_per_step": {name: s}}``) and,
    with ``equal_time`` (the longer baseline run's stats and ``steps``), equal training time."""
    if not cost:
        return []
    sec = cost["seconds_per_step"]
    lines = ["", "## Step cost and equal training time", ""]
    cells = ", ".join(f"{n} {s:.4f} s" for n, s in sec.items())
    lines.append(
        f"Seconds per training step, measured interleaved in one process on {cost['device']} "
        f"(`toy.cost`; the runs' own clocks depend on the machine's load): {cells}."
    )
    base = sec.get("baseline")
    for name, s in sec.items():
        if base and name != "baseline":
            lines.append(f"A {name} step costs {s / base:.2f}x a baseline step.")
    if equal_time and "mr_detr" in results:
        mr, et = results["mr_detr"], equal_time
        better = "Mr. DETR" if mr["AP"] > et["AP"] else "the baseline"
        lines += [
            "",
            f"At equal training time (the baseline trained {et['steps']} steps, the time of "
            f"{mr['steps']} Mr. DETR steps): Mr. DETR AP {mr['AP']:.3f} vs baseline "
            f"{et['AP']:.3f}; {better} is ahead ({mr['AP'] - et['AP']:+.3f} AP).",
        ]
    return lines


def write_report(
    results: dict,
    path: str | Path,
    *,
    quick: bool = False,
    cost: dict | None = None,
    equal_time: dict | None = None,
) -> str:
    """Markdown report: the summary, a table, step costs and equal time; returns the summary."""
    sentence = summary(results, quick)
    title = "smoke test" if quick else "baseline vs Mr. DETR"
    lines = [
        f"# Toy detection: {title}",
        "",
        sentence,
        "",
        "| run | AP | AP50 | AP75 | APs | APm | APl | steps | s/step (own clock) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = dict(results)
    if equal_time:
        rows["baseline (equal time)"] = equal_time
    for name, r in rows.items():
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        cells = " | ".join("n/a" if r[k] is None else f"{r[k]:.3f}" for k in keys)
        lines.append(f"| {name} | {cells} | {r['steps']} | {r['seconds_per_step']:.3f} |")
    lines += [
        "",
        "COCO AP on a 0-1 scale (pycocotools bbox), primary route only, val split. Figures: "
        "`convergence.png`, `attention.png`, `detections.png`. n/a: no val box in that COCO "
        "area range. One seed: at the default settings the seed-to-seed spread of AP is about "
        "0.015 (docs/benchmarks.md), so smaller differences are noise.",
    ]
    lines += equal_time_lines(cost, equal_time, results)
    Path(path).write_text("\n".join(lines) + "\n")
    return sentence
