"""Build the deformable-attention op, run it on every available backend, say which ran and how fast.

    python examples/op_demo.py            # the README's "main job" for now

Shape: a Deformable-DETR decoder call (B=2, 300 queries, 8 heads x 32 channels, 4 levels x 4
points, levels (100,150) .. (13,19)). Every compiled backend is checked against the reference.
"""

from __future__ import annotations

import statistics
import time

import torch

import mrdetr
from mrdetr.ops import available_backends, build, ms_deform_attn


def decoder_inputs(device: str):
    levels = torch.tensor([(100, 150), (50, 75), (25, 38), (13, 19)])
    sizes = levels[:, 0] * levels[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    g = torch.Generator().manual_seed(0)
    value = torch.randn(2, int(sizes.sum()), 8, 32, generator=g)
    loc = torch.rand(2, 300, 8, 4, 4, 2, generator=g)
    attn = torch.rand(2, 300, 8, 4, 4, generator=g).softmax(-1)
    return [t.to(device) for t in (value, levels, starts, loc, attn)]


def median_ms(fn, device: str, reps: int = 10) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    print(
        f"mrdetr {mrdetr.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    t0 = time.perf_counter()
    build(cuda=torch.cuda.is_available())  # compiles on first use, loads the cache after
    status = available_backends()
    print(f"backends ready in {time.perf_counter() - t0:.1f} s (cached builds load in < 1 s):")
    for name, st in status.items():
        print(f"  {name:8s} {'yes' if st.available else 'no ':4s} {st.reason}")
    for device in ("cpu", "cuda"):
        if device == "cuda" and not status["cuda"].available:
            continue
        args = decoder_inputs(device)
        with torch.no_grad():
            ref = ms_deform_attn(*args, backend="pytorch")
            ref_ms = median_ms(lambda a=args: ms_deform_attn(*a, backend="pytorch"), device)
            print(f"{device}: pytorch reference  {ref_ms:8.2f} ms")
            if status[device].available:
                out = ms_deform_attn(*args, backend=device)
                err = (out - ref).abs().max().item()
                ms = median_ms(lambda a=args, d=device: ms_deform_attn(*a, backend=d), device)
                print(
                    f"{device}: compiled kernel    {ms:8.2f} ms  ({ref_ms / ms:.1f}x faster, "
                    f"max |diff| vs reference {err:.1e})"
                )


if __name__ == "__main__":
    main()
