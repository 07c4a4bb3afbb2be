"""Seed study of the toy-detection demo: mean and spread of primary-route AP over seeds.

Run the demo once per seed (equal steps) and the baseline alone with the extra steps that the
routes' cost buys (equal time), then summarise::

    for s in 0 1 2; do
      python examples/toy_detection.py --seed $s --threads 1 --out runs/seed$s
      python examples/toy_detection.py --seed $s --threads 1 --routes baseline \\
          --steps 4200 --eval-every 1050 --out runs/long$s
    done
    python benchmarks/toy_detection_seeds.py runs/seed0 runs/seed1 runs/seed2 \\
        --long runs/long0 runs/long1 runs/long2

With ``--equal-time`` (default on a CUDA device) each demo folder holds its own equal-time
baseline (``baseline_equal_time``, its steps from the step costs measured interleaved in one
process, ``toy.cost``); ``--long`` is then not needed::

    for s in 0 1 2; do
      python examples/toy_detection.py --seed $s --equal-time --out runs/seed$s
    done
    python benchmarks/toy_detection_seeds.py runs/seed0 runs/seed1 runs/seed2

Prints one markdown table: per run, AP / AP50 / AP75 / AR100 mean +- sample sd over the seeds and
the per-seed values, then the paired differences mr_detr - baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ("AP", "AP50", "AP75", "AR100")


def load(folder: str) -> dict:
    """``results.json`` of one demo output folder."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run examples/toy_detection.py first)")
    return json.loads(path.read_text())


def mean_sd(values: list[float]) -> str:
    """``mean +- sd`` (sample sd; no sd for one value)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def row(name: str, runs: list[dict], steps: str) -> str:
    cells = [mean_sd([r[k] for r in runs]) for k in KEYS]
    per_seed = " / ".join(f"{r['AP']:.3f}" for r in runs)
    sps = statistics.mean(r["seconds_per_step"] for r in runs)
    return (
        f"| {name} | {steps} | {len(runs)} | " + " | ".join(cells) + f" | {per_seed} | {sps:.2f} |"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="demo output folders, one per seed")
    p.add_argument("--long", nargs="*", default=[], help="equal-time baseline folders")
    args = p.parse_args(argv)
    results = [load(f) for f in args.runs]
    print("| run | steps | seeds | AP | AP50 | AP75 | AR100 | AP per seed | s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("baseline", "mr_detr"):
        runs = [r[name] for r in results if name in r]
        if runs:
            print(row(name, runs, str(runs[0]["steps"])))
    longs = [load(f)["baseline"] for f in args.long]
    if not longs and all("baseline_equal_time" in r for r in results):
        longs = [r["baseline_equal_time"] for r in results]
    if longs:
        print(row("baseline, equal time", longs, str(longs[0]["steps"])))
    costs = [r["settings"].get("step_cost") for r in results if "settings" in r]
    for c in (c for c in costs[:1] if c):
        sec = c["seconds_per_step"]
        print(f"\nstep cost, measured interleaved on {c['device']}: " + ", ".join(
            f"{n} {v:.4f} s" for n, v in sec.items()))  # fmt: skip
    paired = [r for r in results if "baseline" in r and "mr_detr" in r]
    if paired:
        print()
        for k in KEYS:
            diffs = [r["mr_detr"][k] - r["baseline"][k] for r in paired]
            print(
                f"- mr_detr - baseline, {k} at equal steps: {mean_sd(diffs)} "
                f"(per seed {', '.join(f'{d:+.3f}' for d in diffs)})"
            )
        if longs and len(longs) == len(paired):
            for k in KEYS:
                diffs = [r["mr_detr"][k] - b[k] for r, b in zip(paired, longs, strict=True)]
                print(
                    f"- mr_detr - baseline, {k} at equal time: {mean_sd(diffs)} "
                    f"(per seed {', '.join(f'{d:+.3f}' for d in diffs)})"
                )


if __name__ == "__main__":
    main()
