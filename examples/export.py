"""Export the toy detector to torch.export and ONNX, then check both against eager PyTorch.

    python examples/export.py                                   # a random toy detector
    python examples/export.py --checkpoint toy_detection_out    # the demo's trained model
    python examples/export.py --checkpoint toy_detection_out/mr_detr/last.pt --image-size 96

The model is ``examples/toy_detection.py``'s (``toy.model``), loaded from a checkpoint the demo
wrote (a ``last.pt``, or the demo's ``--out`` folder: its ``mr_detr`` run, else any run) or
built with random weights. Its auxiliary routes are stripped and only the primary route's
``pred_logits [B, Q, K]`` and ``pred_boxes [B, Q, 4]`` are exported, with dynamic batch size and
image height / width. Both exports are traced at one input size and checked at another one;
writes ``model.pt2`` and ``model.onnx`` to ``--out``, prints each runtime's largest difference
from eager PyTorch and its median latency, and exits with status 1 when a runtime differs beyond
fp32 tolerance (``|got - eager| <= atol + rtol * |eager|``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.export import Dim  # noqa: E402
from toy.model import ToyDETRConfig, build_model  # noqa: E402

QUICK_MODEL = dict(dim=32, num_heads=4, ffn_dim=64, num_queries=10, num_decoder_layers=2)


class PrimaryRoute(nn.Module):
    """The deployed detector: ``images [B, 3, H, W]`` -> ``(pred_logits [B, Q, K],
    pred_boxes [B, Q, 4])``, the primary route's last layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(images)["primary"]
        return out["pred_logits"], out["pred_boxes"]


def load_model(checkpoint: str | None, quick: bool, seed: int) -> PrimaryRoute:
    """The demo's model from ``checkpoint`` (file or the demo's ``--out``), else a random one."""
    if checkpoint is None:
        torch.manual_seed(seed)
        kwargs = QUICK_MODEL if quick else {}
        model = build_model(ToyDETRConfig(routes="mr_detr", two_stage=True, **kwargs))
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
        if path.is_dir():
            runs = sorted(path.glob("*/last.pt"), key=lambda p: p.parent.name != "mr_detr")
            if not runs:
                raise FileNotFoundError(f"no <run>/last.pt under {path} (the demo's --out)")
            path = runs[0]
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = build_model(ToyDETRConfig(**state["model_cfg"]))
        model.load_state_dict(state["model"])
        print(f"loaded {path} (routes {model.cfg.routes}, {state['history']['steps']} steps)")
    model.eval()
    model.decoder.strip_auxiliary()
    return PrimaryRoute(model).eval()


def median_ms(fn, runs: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def onnxruntime_session(model_proto, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(
        model_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )


def within(got: tuple[Tensor, ...], expected: tuple[Tensor, ...], atol: float, rtol: float):
    """``(max |got - expected|, every element within atol + rtol * |expected|)``."""
    diff, ok = 0.0, True
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            return float("inf"), False
        err = (g.double() - e.double()).abs()
        diff = max(diff, float(err.max()))
        ok = ok and bool((err <= atol + rtol * e.double().abs()).all())
    return diff, ok


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="a demo last.pt, or the demo's --out folder")
    p.add_argument("--out", default="export_out", help="folder for model.pt2 and model.onnx")
    p.add_argument("--image-size", type=int, default=64, help="export-time image size")
    p.add_argument("--batch-size", type=int, default=2, help="export-time batch size")
    p.add_argument("--runs", type=int, default=10, help="timed calls per runtime")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--quick", action="store_true", help="a smaller random model (tests)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Export, check, time; returns the exit status (1: a runtime differs beyond tolerance)."""
    args = parse_args(argv)
    from mrdetr.export import export_onnx

    model = load_model(args.checkpoint, args.quick, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    s, b = args.image_size, args.batch_size
    example = torch.rand(b, 3, s, s, generator=g)
    # checked at another batch size and a non-square image (stride-32 levels need sides > 32)
    images = torch.rand(b + 1, 3, s + 32, max(s - 16, 40), generator=g)
    dims = ({0: Dim("batch"), 2: Dim("height", min=33), 3: Dim("width", min=33)},)
    with torch.inference_mode():
        expected = model(images)
    program = torch.export.export(model, (example,), dynamic_shapes=dims)
    torch.export.save(program, out / "model.pt2")
    exported = program.module()
    onnx_program = export_onnx(model, (example,), out / "model.onnx", dynamic_shapes=dims)
    session = onnxruntime_session(onnx_program.model_proto, torch.get_num_threads())
    feed = {session.get_inputs()[0].name: images.numpy()}

    def run_onnx():
        return tuple(torch.from_numpy(o) for o in session.run(None, feed))

    runtimes = {
        "eager": lambda: model(images),
        "torch.export": lambda: exported(images),
        "onnxruntime": run_onnx,
    }
    print(f"export at {tuple(example.shape)}, check at {tuple(images.shape)}; files in {out}/")
    print(f"{'runtime':<14}{'max |diff| vs eager':>22}{'median ms':>12}")
    failed = []
    with torch.inference_mode():
        for name, fn in runtimes.items():
            diff, ok = within(fn(), expected, args.atol, args.rtol)
            ms = median_ms(fn, args.runs)
            print(f"{name:<14}{diff:>22.3g}{ms:>12.1f}{'' if ok else '  BEYOND TOLERANCE'}")
            if not ok:
                failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)} differ from eager beyond atol={args.atol} "
              f"rtol={args.rtol}")  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
