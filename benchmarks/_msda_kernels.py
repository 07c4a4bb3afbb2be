"""Old vs new CPU kernel of ``ms_deform_attn``: ``benchmarks/ms_deform_attn.py --baseline REV``.

The CPU kernel sources of git revision REV are built into a private folder, and each kernel is
timed in its own fresh process (two libraries registering ``mrdetr::`` kernels cannot share
one) on the raw ops: ``torch.ops.mrdetr.ms_deform_attn_forward`` and forward + backward op with
``grad_output = 1``, after a few seconds of untimed calls (see ``settle``). Processes alternate
(baseline, current, baseline, ...) for ``--rounds`` rounds and the lowest median of each row is
kept, so a burst of load from other jobs on a shared machine spoils one round, not the
comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def build_baseline(rev: str) -> str:
    """Build the CPU kernel of git revision ``rev``; return the shared library's path."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=12", rev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    folder = Path(tempfile.gettempdir()) / f"mrdetr-bench-{os.getuid()}" / commit
    src = folder / "src"
    if not (src / "ms_deform_attn" / "cpu").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "csrc/ms_deform_attn"],
            capture_output=True,
            check=True,
        ).stdout
        tar_path = folder / "src.tar"
        tar_path.write_bytes(archive)
        with tarfile.open(tar_path) as tar:
            tar.extractall(folder, filter="data")
        (folder / "csrc" / "ms_deform_attn").rename(src / "ms_deform_attn")
    root = src / "ms_deform_attn"
    # The kernels only: the op schema comes from `import mrdetr.ops` (Python) in the worker, so a
    # revision's C++ schema file (ms_deform_attn.cpp, before it moved to Python) is left out.
    sources = [root / "cpu" / "ms_deform_attn_cpu.cpp"]
    code = (
        "import sys; from torch.utils import cpp_extension; "
        "cpp_extension.load(name=sys.argv[1], sources=sys.argv[4:], build_directory=sys.argv[2], "
        "extra_include_paths=[sys.argv[3]], extra_cflags=['-O3', '-fopenmp'], "
        "extra_ldflags=['-fopenmp'], is_python_module=False)"
    )
    name = f"mrdetr_msda_bench_{commit}"
    build = folder / "build"
    build.mkdir(exist_ok=True)
    args = [sys.executable, "-c", code, name, str(build), str(root)]
    subprocess.run(args + [str(s) for s in sources if s.is_file()], check=True)
    return str(build / f"{name}.so")


def settle(ops, bench, seconds: float = 3.0):
    """Run decoder forward + backward calls for ``seconds`` before anything is timed.

    On the 2-core development VM the first 10-30 calls of a fresh process with 2 threads
    sometimes take 3-6x their steady time (both kernels, cause not found); the process that hit
    this phase would lose the comparison for a reason that has nothing to do with its kernel.
    """
    value, ss, lsi, loc, attn = bench.make_inputs(bench.DETR_LEVELS, 300, "cpu", torch.float32)
    grad = torch.ones(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        ops.ms_deform_attn_forward(value, ss, lsi, loc, attn)
        ops.ms_deform_attn_backward(grad, value, ss, lsi, loc, attn)


def worker(library: str, cases: list[str], samplings: list[str], threads: int, reps: int):
    """Print JSON ``{"case/sampling": [fwd_ms, fwd_bwd_ms]}`` for one kernel (fresh process)."""
    sys.path.insert(0, str(HERE))
    import ms_deform_attn as bench  # puts this checkout's mrdetr first on sys.path

    torch.set_num_threads(threads)
    if library == "current":
        args = bench.make_inputs([(4, 4)], 3, "cpu", torch.float32)
        bench.ms_deform_attn(*args, backend="cpu")  # builds / loads the current kernel
    else:
        torch.ops.load_library(library)
    ops = torch.ops.mrdetr
    settle(ops, bench)
    out = {}
    for key in cases:
        _, levels, q = bench.CASES[key]
        for sampling in samplings:
            value, ss, lsi, loc, attn = bench.make_inputs(
                levels, q, "cpu", torch.float32, sampling=sampling
            )
            grad = torch.ones(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])

            def fwd(value=value, ss=ss, lsi=lsi, loc=loc, attn=attn):
                return ops.ms_deform_attn_forward(value, ss, lsi, loc, attn)

            def fwd_bwd(value=value, ss=ss, lsi=lsi, loc=loc, attn=attn, grad=grad):
                ops.ms_deform_attn_forward(value, ss, lsi, loc, attn)
                ops.ms_deform_attn_backward(grad, value, ss, lsi, loc, attn)

            out[f"{key}/{sampling}"] = [
                bench.timeit(fwd, "cpu", reps),
                bench.timeit(fwd_bwd, "cpu", reps),
            ]
    print(json.dumps(out))


def _run_worker(library, args, threads):
    cmd = [
        sys.executable,
        __file__,
        "worker",
        library,
        str(threads),
        str(args.reps),
        ",".join(args.cases),
        ",".join(args.samplings),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=str(ROOT))
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args, threads_list):
    """Time the baseline revision's kernel and the current one; print both and their ratios."""
    library = build_baseline(args.baseline)
    print(
        f"kernels: baseline {args.baseline} vs current working tree; raw ops, medians of "
        f"{args.reps} after warm-up, best of {args.rounds} alternating rounds (ms)"
    )
    for threads in threads_list:
        best = {"baseline": {}, "current": {}}
        for _ in range(args.rounds):
            for who, lib in (("baseline", library), ("current", "current")):
                for row, times in _run_worker(lib, args, threads).items():
                    old = best[who].get(row, [float("inf")] * 2)
                    best[who][row] = [min(a, b) for a, b in zip(old, times, strict=True)]
        print(f"-- {threads} thread(s)")
        for row in best["current"]:
            (bf, bfb), (cf, cfb) = best["baseline"][row], best["current"][row]
            print(
                f"{row:24s} fwd {bf:8.2f} -> {cf:8.2f} ms ({bf / cf:4.2f}x)   "
                f"fwd+bwd {bfb:8.2f} -> {cfb:8.2f} ms ({bfb / cfb:4.2f}x)"
            )
        for key in args.cases:
            u, h = f"{key}/uniform", f"{key}/hot"
            if u in best["current"] and h in best["current"]:
                ratios = [
                    f"{who} fwd {best[who][u][0] / best[who][h][0]:4.2f} "
                    f"fwd+bwd {best[who][u][1] / best[who][h][1]:4.2f}"
                    for who in ("baseline", "current")
                ]
                print(f"{key:24s} uniform / hot: " + "   ".join(ratios))


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _, _, lib, n, reps, cases, samplings = sys.argv
    worker(lib, cases.split(","), samplings.split(","), int(n), int(reps))
