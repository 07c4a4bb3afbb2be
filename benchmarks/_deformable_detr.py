"""mrdetr's kernel against Deformable-DETR's: ``ms_deform_attn.py --against-deformable-detr PATH``.

PATH is the ``models/ops/src`` folder (or ``models/ops``) of a Deformable-DETR checkout the user
has. Its CUDA op is built at run time from those files with ``torch.utils.cpp_extension.load``
(nothing of it is copied here) into ``$MRDETR_BUILD_DIR/deformable_detr`` and called as
Deformable-DETR's ``MSDeformAttnFunction`` calls it (``im2col_step=64``). Its kernel is CUDA only
and float32/float64 only: on a CPU, or in half precision, its column says why it is missing.

Cases (issue 18): COCO-sized levels, 8 heads x 32 channels, 4 points; decoder B2 Q300, decoder B2
Q2700 (3 routes x 900 packed), decoder B8 Q900, encoder B2 (Q = S); near / uniform / hot
sampling; float32, float16, bfloat16. Ratios: Deformable-DETR time / mrdetr time (higher = mrdetr
faster) in float32, and mrdetr float32 / mrdetr half time for the half-precision rows.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
CASES = {
    "dec-B2-Q300": (2, 300),
    "dec-B2-Q2700": (2, 2700),
    "dec-B8-Q900": (8, 900),
    "enc-B2": (2, None),
}
DTYPES = ("float32", "float16", "bfloat16")
SAMPLINGS = ("near", "uniform", "hot")
# files a Deformable-DETR models/ops/src folder holds that the CUDA build needs
REQUIRED = (
    "vision.cpp",
    "ms_deform_attn.h",
    "cpu/ms_deform_attn_cpu.h",
    "cuda/ms_deform_attn_cuda.h",
    "cuda/ms_deform_attn_cuda.cu",
    "cuda/ms_deform_im2col_cuda.cuh",
)


def sources(path: str) -> Path:
    """The ``src`` folder under ``path``, or ``SystemExit`` naming every missing file."""
    root = Path(path).expanduser().resolve()
    src = root / "src" if (root / "src" / "vision.cpp").is_file() else root
    missing = [f for f in REQUIRED if not (src / f).is_file()]
    if missing:
        raise SystemExit(
            f"--against-deformable-detr {path}: not a Deformable-DETR models/ops/src folder; "
            f"missing {', '.join(missing)} under {src}. Pass the models/ops/src folder of a "
            "checkout of https://github.com/fundamentalvision/Deformable-DETR."
        )
    return src


def build(src: Path):
    """Build Deformable-DETR's op from the user's ``src`` (a Python module), or ``SystemExit``."""
    sys.path.insert(0, str(HERE.parent))
    from mrdetr.ops import _build, _toolchain

    why = _toolchain.missing_tools("cuda")
    if why:
        raise SystemExit(f"cannot build Deformable-DETR's CUDA op: {why}")
    ext = _toolchain.cpp_extension("cuda")
    folder = _build.build_directory("cuda").parent / "deformable_detr"
    folder.mkdir(parents=True, exist_ok=True)
    half = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__"]
    try:
        with _build._folder_lock(folder):  # one build at a time; a killed one's lock is stale
            _build._remove_stale_baton(folder)
            return ext.load(
                name="deformable_detr_msda",
                sources=[str(src / "vision.cpp"), str(src / "cuda" / "ms_deform_attn_cuda.cu")],
                extra_include_paths=[str(src)],
                extra_cflags=["-O3", "-DWITH_CUDA"],
                extra_cuda_cflags=["-O3", "-DWITH_CUDA", "-DCUDA_HAS_FP16=1", *half],
                build_directory=str(folder),
                verbose=os.environ.get("MRDETR_VERBOSE_BUILD", "") not in ("", "0"),
            )
    except Exception as exc:  # noqa: BLE001  say why, with the compiler's last lines
        tail = " | ".join(str(exc).strip().splitlines()[-6:])[-1500:]
        raise SystemExit(
            f"building Deformable-DETR's op from {src} failed: {tail}\n(Its 2020 sources use "
            "APIs that current PyTorch removed: `.type().is_cuda()`, `AT_DISPATCH_*(x.type(), "
            "...)`, `.data<T>()`, `AT_ASSERTM`; a checkout updated for PyTorch 2 builds.)"
        ) from exc


class _DeformableDETRFunction(torch.autograd.Function):
    """Autograd around the built op, the way Deformable-DETR's MSDeformAttnFunction calls it."""

    ext = None

    @staticmethod
    def forward(ctx, value, shapes, starts, loc, attn):
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return _DeformableDETRFunction.ext.ms_deform_attn_forward(
            value, shapes, starts, loc, attn, 64
        )

    @staticmethod
    def backward(ctx, grad):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        gv, gl, ga = _DeformableDETRFunction.ext.ms_deform_attn_backward(
            value, shapes, starts, loc, attn, grad.contiguous(), 64
        )
        return gv, None, None, gl, ga


def _runners(bench, inputs):
    """``{name: (forward, forward+backward)}`` callables for mrdetr and Deformable-DETR."""
    value, ss, lsi, loc, attn = inputs
    device = value.device.type

    def mrdetr(v, sl, a):
        return bench.ms_deform_attn(v, ss, lsi, sl, a, backend=device, spatial_shapes_list=LEVELS)

    def ddetr(v, sl, a):
        return _DeformableDETRFunction.apply(v, ss, lsi, sl, a)

    out = {}
    for name, fn in (("mrdetr", mrdetr), ("ddetr", ddetr)):

        def fwd(fn=fn):
            with torch.no_grad():
                fn(value, loc, attn)

        def fwd_bwd(fn=fn):
            leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
            fn(*leaves).sum().backward()

        out[name] = (fwd, fwd_bwd)
    return out


def compare(args) -> None:
    """Time every case, sampling and dtype; print a table with the ratios."""
    sys.path.insert(0, str(HERE))
    import ms_deform_attn as bench

    src = sources(args.against_deformable_detr)
    device = args.device
    if device == "cuda":
        _DeformableDETRFunction.ext = build(src)
        print(f"Deformable-DETR's op built from {src}")
    else:
        print(f"Deformable-DETR sources found in {src}; its kernel is CUDA only: on {device}")
        print("only mrdetr's kernel is timed (use --device cuda for the comparison)")
    print("columns: ms median of --reps; ratio = Deformable-DETR / mrdetr (higher: mrdetr faster)")
    print("         half rows: ratio = mrdetr float32 / mrdetr half")
    for key in args.ddetr_cases:
        batch, queries = CASES[key]
        for sampling in SAMPLINGS:
            fp32 = None
            for dtype_name in args.ddetr_dtypes:
                dtype = getattr(torch, dtype_name)
                inputs = bench.make_inputs(
                    LEVELS, queries, device, dtype, batch=batch, sampling=sampling
                )
                run = _runners(bench, inputs)
                mine = [bench.timeit(f, device, args.reps) for f in run["mrdetr"]]
                label = f"{key:13s} {sampling:7s} {dtype_name:8s}"
                line = f"{label} mrdetr fwd {mine[0]:8.3f}  fwd+bwd {mine[1]:8.3f}"
                if dtype == torch.float32:
                    fp32 = mine
                    if _DeformableDETRFunction.ext is not None:
                        theirs = [bench.timeit(f, device, args.reps) for f in run["ddetr"]]
                        line += (
                            f"   Deformable-DETR fwd {theirs[0]:8.3f} ({theirs[0] / mine[0]:4.2f}x)"
                            f"  fwd+bwd {theirs[1]:8.3f} ({theirs[1] / mine[1]:4.2f}x)"
                        )
                    else:
                        line += "   Deformable-DETR n/a (CUDA only)"
                elif fp32 is not None:
                    line += (
                        f"   vs float32: fwd {fp32[0] / mine[0]:4.2f}x"
                        f"  fwd+bwd {fp32[1] / mine[1]:4.2f}x"
                    )
                print(line, flush=True)
