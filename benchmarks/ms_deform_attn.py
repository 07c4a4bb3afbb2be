"""Benchmark ``ms_deform_attn``: compiled kernels against the PyTorch reference, same run.

    python benchmarks/ms_deform_attn.py                        # CPU, 1 and 2 threads, fp32
    python benchmarks/ms_deform_attn.py --baseline bad594d     # + the kernel of a git revision
    python benchmarks/ms_deform_attn.py --device cuda          # on a GPU
    python benchmarks/ms_deform_attn.py --device cuda --against-deformable-detr PATH
                      # + Deformable-DETR's CUDA kernel, built from PATH (its models/ops/src)

Prints medians (ms) over ``--reps`` repetitions after warm-up and the reference/kernel ratio
(higher = kernel faster) for three sampling patterns (see ``sampling_locations``): ``uniform``
(every location random on the map), ``near`` (around a per-query reference point, as in a
trained model) and ``hot`` (every location in one small cluster, so every read hits the cache).
The kernel's uniform / hot time ratio measures how well it hides memory latency (1 = reads cost
nothing beyond their arithmetic), independently of the machine's speed. ``--memory`` adds the
peak memory of one forward+backward (fp32). ``--baseline REV`` times the CPU kernel of a git
revision and the current one on the raw ops (see ``benchmarks/_msda_kernels.py``).
``--against-deformable-detr PATH`` times issue 18's cases against Deformable-DETR's kernel, built
from the user's checkout at run time (see ``benchmarks/_deformable_detr.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

# this checkout's mrdetr, not another one installed in the environment (editable or not)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mrdetr.ops import ms_deform_attn  # noqa: E402

DETR_LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
SQUARE_LEVELS = [(64, 64), (32, 32), (16, 16), (8, 8)]
SAMPLINGS = ("uniform", "near", "hot")
CASES = {
    "decoder": ("decoder Q=300 DETR levels", DETR_LEVELS, 300),
    "encoder": ("encoder DETR levels", DETR_LEVELS, None),
    "encoder-square": ("encoder 64^2..8^2", SQUARE_LEVELS, None),
}
NEAR_PIXELS = 4.0  # std of a "near" location around its reference point, in pixels of its level
HOT_SPAN = 0.02  # side of the "hot" cluster, as a fraction of the map


def sampling_locations(levels, batch, queries, heads, points, sampling, generator):
    """Locations ``[B, Q, H, L, P, 2]`` in [0, 1] (x, y) for a sampling pattern.

    uniform: independent uniform locations. near: a reference point per query (decoder: uniform;
    encoder, ``queries == S``: the query's own pixel) plus a Gaussian offset of ``NEAR_PIXELS``
    pixels of each level. hot: uniform in a ``HOT_SPAN``-wide square at the map's centre.
    """
    nl = len(levels)
    shape = (batch, queries, heads, nl, points, 2)
    if sampling == "uniform":
        return torch.rand(shape, generator=generator)
    if sampling == "hot":
        return 0.5 + HOT_SPAN * (torch.rand(shape, generator=generator) - 0.5)
    if sampling != "near":
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    sizes = [h * w for h, w in levels]
    if queries == sum(sizes):  # encoder: each query sits on its own pixel
        refs = []
        for h, w in levels:
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            refs.append(torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2))
        ref = torch.cat(refs)[None].expand(batch, queries, 2)  # [B, Q, 2]
    else:
        ref = torch.rand(batch, queries, 2, generator=generator)
    wh = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)  # [L, 2]
    offset = torch.randn(shape, generator=generator) * NEAR_PIXELS / wh[:, None, :]
    return (ref[:, :, None, None, None, :] + offset).clamp(0.0, 1.0)


def make_inputs(
    levels, num_queries, device, dtype, batch=2, heads=8, dim=32, points=4, sampling="uniform"
):
    """Random op inputs; ``num_queries=None`` makes every value token a query (encoder)."""
    g = torch.Generator().manual_seed(0)
    ss = torch.tensor(levels, dtype=torch.int64)
    sizes = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    q = s if num_queries is None else num_queries
    nl = len(levels)
    value = torch.randn(batch, s, heads, dim, generator=g)
    loc = sampling_locations(levels, batch, q, heads, points, sampling, g)
    attn = torch.rand(batch, q, heads, nl, points, generator=g).softmax(-1)
    tensors = [value, ss, lsi, loc, attn]
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else None) for t in tensors]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps, warmup=2):
    """Median wall time (ms) of ``fn`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_memory(case, backend, device, threads):
    """Peak memory (bytes) of one forward+backward beyond its inputs.

    CUDA: ``max_memory_allocated``. CPU: growth of the peak resident set (Linux ``VmHWM``) of
    a fresh process, so every allocation counts, not only torch's.
    """
    if device == "cuda":
        inputs = make_inputs(*case, device, torch.float32)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(inputs, backend)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys, torch; sys.path.insert(0, {here!r}); import ms_deform_attn as m; "
        f"torch.set_num_threads({threads}); "
        f"print(m.rss_growth({case[0]!r}, {case[1]!r}, {backend!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_growth(levels, num_queries, backend):
    """Peak resident-set growth (bytes) of one forward+backward in this (fresh) process."""
    inputs = make_inputs(levels, num_queries, "cpu", torch.float32)
    fwd_bwd(make_inputs([(4, 4)], 3, "cpu", torch.float32), backend)  # load/build outside
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    base = _status_kib("VmRSS")
    fwd_bwd(inputs, backend)
    return (_status_kib("VmHWM") - base) * 1024


def fwd_bwd(inputs, backend):
    """One forward and backward of ``ms_deform_attn`` with gradients for value/loc/weights."""
    value, ss, lsi, loc, attn = inputs
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], backend=backend)
    out.sum().backward()


def time_backends(inputs, device, reps):
    """Median ms of reference forward, kernel forward, reference fwd+bwd, kernel fwd+bwd."""
    value, ss, lsi, loc, attn = inputs

    def fwd(backend):
        with torch.no_grad():
            ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)

    return (
        timeit(lambda: fwd("pytorch"), device, reps),
        timeit(lambda: fwd(device), device, reps),
        timeit(lambda: fwd_bwd(inputs, "pytorch"), device, reps),
        timeit(lambda: fwd_bwd(inputs, device), device, reps),
    )


def run_case(name, case, device, dtype, reps, samplings, memory):
    """Time forward and forward+backward of kernel and reference per sampling; print ratios."""
    kernel_times = {}
    for sampling in samplings:
        inputs = make_inputs(*case, device, dtype, sampling=sampling)
        ref_f, ker_f, ref_fb, ker_fb = time_backends(inputs, device, reps)
        kernel_times[sampling] = (ker_f, ker_fb)
        line = (
            f"{name:26s} {sampling:7s} fwd {ref_f:8.2f} / {ker_f:7.2f} ms = {ref_f / ker_f:5.1f}x"
            f"   fwd+bwd {ref_fb:8.2f} / {ker_fb:7.2f} ms = {ref_fb / ker_fb:5.1f}x"
        )
        if memory and dtype == torch.float32 and sampling == samplings[0]:
            mem_ref = peak_memory(case, "pytorch", device, torch.get_num_threads())
            mem_ker = peak_memory(case, device, device, torch.get_num_threads())
            line += (
                f"   peak mem {mem_ker / 2**20:7.1f} / {mem_ref / 2**20:7.1f} MiB = "
                f"{mem_ker / max(mem_ref, 1):4.2f}x"
            )
        print(line, flush=True)
    if "uniform" in kernel_times and "hot" in kernel_times:
        (uf, ufb), (hf, hfb) = kernel_times["uniform"], kernel_times["hot"]
        print(f"{name:26s} kernel uniform / hot: fwd {uf / hf:4.2f}   fwd+bwd {ufb / hfb:4.2f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--samplings", nargs="+", default=list(SAMPLINGS), choices=SAMPLINGS)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="git revision whose CPU kernel to time against the current one (raw ops)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (--baseline)")
    parser.add_argument(
        "--against-deformable-detr",
        metavar="PATH",
        help="models/ops/src of a Deformable-DETR checkout: time its CUDA kernel against ours",
    )
    ddetr_cases = ["dec-B2-Q300", "dec-B2-Q2700", "dec-B8-Q900", "enc-B2"]
    parser.add_argument("--ddetr-cases", nargs="+", default=ddetr_cases, choices=ddetr_cases)
    parser.add_argument(
        "--ddetr-dtypes",
        nargs="+",
        default=["float32", "float16", "bfloat16"],
        choices=["float32", "float16", "bfloat16"],
    )
    return parser.parse_args(argv)


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    device = args.device
    threads = args.threads if device == "cpu" else [torch.get_num_threads()]
    print(f"torch {torch.__version__}, device {device}, dtype {args.dtype}, B=2, H=8, D=32, P=4")
    if args.against_deformable_detr:
        import _deformable_detr

        _deformable_detr.compare(args)
        return
    if args.baseline:
        import _msda_kernels

        _msda_kernels.compare(args, threads)
        return
    print("columns: reference / kernel (ratio = reference time / kernel time)")
    for n in threads:
        torch.set_num_threads(n)
        print(f"-- {n} thread(s)" if device == "cpu" else "-- cuda")
        for key in args.cases:
            name, levels, q = CASES[key]
            run_case(name, (levels, q), device, dtype, args.reps, args.samplings, args.memory)


if __name__ == "__main__":
    main()
