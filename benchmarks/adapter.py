"""Benchmark: the adapter's routes and fast attention on HF transformers' Deformable-DETR.

A random-init ``DeformableDetrForObjectDetection`` (6 encoder + 6 decoder layers, d256, 8 heads,
FFN 1024, 300 queries, 4 levels, box refinement + two-stage; transformers' ResNet-50 backbone, or
with ``--backbone small`` a basic-block ResNet of widths 32-128), batch 2 of 320x320 images
(``--image-size``) on the CPU; with ``--device cuda`` batch 4 of 800x800 (the configuration of
the first GPU measurement), optionally under ``--amp bf16|fp16`` autocast.
One training step = forward, per-route predictions from the model's heads,
``MultiRouteCriterion`` (Hungarian for the primary route, one-to-many for the auxiliary ones),
backward. Configurations, timed interleaved in one run:

- ``unwrapped``: the HF model, primary route only (the baseline);
- ``adapter``: ``mrdetr.adapters.wrap`` with Mr. DETR's three routes, packed;
- ``reference``: the same three routes the reference way: the encoder once, then the decoder
  called once per route (each auxiliary route with its own FFN / norm / instruction tokens
  swapped in, attending through the shared weights);
- ``unwrapped + fast``: the baseline after ``use_fast_deformable_attention`` (encoder and
  decoder deformable sampling on mrdetr's CPU kernel instead of transformers' ``grid_sample``);
- ``adapter + fast``: both.

The decoder alone (forward + backward on the inputs the model gives it) is timed too, unwrapped
and with the three routes packed: the routes' extra decoder time, as a fraction of the unwrapped
step, is what the adapter cannot avoid (every route runs every decoder layer on its queries).

``--tuned-malloc`` reruns the script with glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised, so freed large blocks stay in the process instead of going
back to the kernel (with the defaults every large temporary of transformers' pure-PyTorch
deformable attention is fresh memory, page-faulted again on every call).

Times are medians over ``--reps`` interleaved repetitions after ``--warmup``. Beside the ratio
of the medians, the median of the per-repetition ratios (each row's step over the unwrapped
step of the same repetition) is printed: it follows the two rows through the same state of the
machine and is the steadier figure. The floor line is ``1 + (routes' extra decoder time) /
(unwrapped step)``: no packing can bring the adapter's ratio below it, since every route runs
every decoder layer on its queries.

Each row also prints what one step costs besides its time (``benchmarks/_step_counts.py``):
ATen operations (kernel launches on a GPU) and host reads (device-to-host synchronisations on a
GPU), counted the same on any machine, and on CUDA the GPU's own busy time from
``torch.profiler``.

Usage::

    python benchmarks/adapter.py [--device cpu|cuda] [--amp none|bf16|fp16] [--batch N]
        [--image-size S] [--reps 5] [--warmup 3] [--threads 2] [--backbone resnet50|small]
        [--tuned-malloc] [--configs adapter,reference,...] [--counts-only]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
from _step_counts import count_step, gpu_busy_ms, sync
from torch import nn

from mrdetr import MultiRouteCriterion, RouteMatcher, adapters, routes
from mrdetr.adapters import RouteOutputs
from mrdetr.adapters.hf_compat import layer_ffn_names
from mrdetr.routing import attention_weights, instructive_attend
from mrdetr.testing.hf_models import hf_deformable_detr, random_detection_batch

CLASSES = 80
ROUTES = routes.mr_detr()
CONFIGS = ("unwrapped", "adapter", "reference", "unwrapped + fast", "adapter + fast")
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "137438953472"}


def build(backbone: str = "resnet50"):
    """The benchmarked model; ``backbone``: ``"resnet50"`` (transformers' default ResNet-50, as
    in the published models) or ``"small"`` (a basic-block ResNet of widths 32-128)."""
    sizes = dict(backbone="resnet50") if backbone == "resnet50" else dict(backbone_width=32)
    return hf_deformable_detr(
        d_model=256, encoder_layers=6, decoder_layers=6, num_heads=8, ffn_dim=1024,
        num_queries=300, num_labels=CLASSES, num_points=4, with_box_refine=True, two_stage=True,
        dropout=0.0, **sizes,
    )  # fmt: skip


class _InstructedAttention(nn.Module):
    """HF self-attention with instruction tokens, through the host's weights (reference way)."""

    def __init__(self, host: nn.Module, own: nn.Module) -> None:
        super().__init__()
        self.host, self.own = host, own

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        qk = hidden_states + position_embeddings
        own = self.own
        out = instructive_attend(
            qk, qk, hidden_states, attention_weights(self.host), own.tokens + own.tokens_pos,
            own.tokens, attn_mask=attention_mask,
        )[0]  # fmt: skip
        return out, None


@contextlib.contextmanager
def route_swapped(decoder: nn.Module, aux: list, name: str):
    """The decoder's layers with route ``name``'s own modules in place, for one pass."""
    saved = []
    for layer, owned in zip(decoder.layers, aux, strict=True):
        own = owned[name] if name in owned else None
        ffn = layer_ffn_names(layer)  # ("mlp",) in transformers 5.x, ("fc1", "fc2") in 4.57
        saved.append({n: getattr(layer, n) for n in ("self_attn", "self_attn_layer_norm", *ffn)})
        if own is None:
            continue
        if hasattr(own, "ffn"):
            for n, module in zip(ffn, own.ffn, strict=True):
                setattr(layer, n, module)
        if hasattr(own, "self_attn_norm"):
            layer.self_attn_layer_norm = own.self_attn_norm
        if hasattr(own, "tokens"):
            layer.self_attn = _InstructedAttention(layer.self_attn, own)
    try:
        yield
    finally:
        for layer, modules in zip(decoder.layers, saved, strict=True):
            for n, module in modules.items():
                setattr(layer, n, module)


def _route_output(output, first_reference) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, 1, B, Q, C], [N, 1, B, Q, 4])`` from an HF decoder (or model) output: every
    layer's hidden states and the reference each layer received."""
    hidden = output.intermediate_hidden_states.transpose(0, 1)[:, None]
    produced = output.intermediate_reference_points.transpose(0, 1)[:, None]
    return hidden, torch.cat([first_reference[None, None], produced[:-1]])


def primary_outputs(model, pixels) -> tuple[object, RouteOutputs]:
    """The unwrapped model's forward and its layers as a one-route :class:`RouteOutputs`."""
    out = model(pixels)
    hidden, refs = _route_output(out, out.init_reference_points)
    return out, RouteOutputs(ROUTES[:1], hidden, {}, refs)


@contextlib.contextmanager
def decoder_kwargs(model):
    """Inside the block, the dict fills with the keyword arguments of ``model``'s decoder call."""
    captured = {}
    hook = model.model.decoder.register_forward_pre_hook(
        lambda _m, _a, kw: captured.update(kw), with_kwargs=True
    )
    try:
        yield captured
    finally:
        hook.remove()


def reference_outputs(model, aux, pixels) -> tuple[object, RouteOutputs]:
    """The reference way: the model's own forward (encoder + the primary route's decoder
    pass), then the decoder once more per auxiliary route with that route's modules in."""
    decoder = model.model.decoder
    with decoder_kwargs(model) as captured:
        out = model(pixels)
    h, r = _route_output(out, out.init_reference_points)
    hidden, refs = [h], [r]
    for route in ROUTES[1:]:
        with route_swapped(decoder, aux, route.name):
            h, r = _route_output(decoder(**captured), out.init_reference_points)
        hidden.append(h)
        refs.append(r)
    return out, RouteOutputs(ROUTES, torch.cat(hidden, 1), {}, torch.cat(refs, 1))


def _decoder_inputs(model, pixels) -> dict:
    """The keyword arguments ``model`` passes its decoder for ``pixels``, as leaf tensors."""
    with decoder_kwargs(model) as captured, torch.no_grad():
        model(pixels)
    return {
        k: v.detach().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
        for k, v in captured.items()
    }


def _decoder_seconds(model, inputs: dict, warmup: int, reps: int, device: str = "cpu") -> float:
    """Median seconds of ``model``'s decoder alone, forward + backward of every route's hidden
    states and references (one route unwrapped, all routes packed when wrapped)."""
    times = []
    for rep in range(warmup + reps):
        sync(device)
        t = time.perf_counter()
        out = model.model.decoder(**inputs)
        loss = out.intermediate_hidden_states.sum() + out.intermediate_reference_points.sum()
        if adapters.is_wrapped(model):
            routes_out = adapters.route_outputs(model)
            loss = loss + routes_out.hidden_states.sum() + routes_out.reference_points.sum()
        loss.backward()
        sync(device)
        if rep >= warmup:
            times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--batch", type=int, default=None, help="default 2 (CPU), 4 (CUDA)")
    parser.add_argument("--image-size", type=int, default=None, help="default 320 / 800 (CUDA)")
    parser.add_argument(
        "--counts-only", action="store_true", help="ATen operations and host reads only, no timing"
    )
    parser.add_argument("--backbone", choices=("resnet50", "small"), default="resnet50")
    parser.add_argument(
        "--tuned-malloc", action="store_true", help="glibc keeps freed large blocks (docstring)"
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS[1:]),
        help=f"comma-separated rows to time beside 'unwrapped', from {', '.join(CONFIGS[1:])}",
    )  # fmt: skip
    args = parser.parse_args()
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CONFIGS[1:]))
    if unknown:
        parser.error(f"--configs: unknown rows {unknown}; expected some of {list(CONFIGS[1:])}")
    if args.tuned_malloc and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})
    tuned = all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items())
    torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cuda = dev == "cuda"
    size = args.image_size or (800 if cuda else 320)
    batch = args.batch or (4 if cuda else 2)
    pixels, targets = random_detection_batch(batch=batch, image_size=size, num_labels=CLASSES)
    pixels, targets = pixels.to(dev), [{k: v.to(dev) for k, v in t.items()} for t in targets]
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    plain = build(args.backbone).to(dev)
    fast = adapters.use_fast_deformable_attention(copy.deepcopy(plain), backend=dev)
    wrapped = adapters.wrap(copy.deepcopy(plain), ROUTES)
    wrapped_fast = adapters.use_fast_deformable_attention(copy.deepcopy(wrapped), backend=dev)
    ref_model = copy.deepcopy(wrapped)
    aux = [dict(a.items()) for a in ref_model.model.decoder.mrdetr_routes.aux]
    adapters.unwrap(ref_model)
    criterion = MultiRouteCriterion(CLASSES, RouteMatcher.for_routes(ROUTES))

    def adapter_outputs(model, pixels):
        out = model(pixels)
        return out, adapters.route_outputs(model)

    configs = {
        "unwrapped": (plain, primary_outputs),
        "adapter": (wrapped, adapter_outputs),
        "reference": (ref_model, lambda m, p: reference_outputs(m, aux, p)),
        "unwrapped + fast": (fast, primary_outputs),
        "adapter + fast": (wrapped_fast, adapter_outputs),
    }
    configs = {k: v for k, v in configs.items() if k == "unwrapped" or k in chosen}

    def step(name):
        model, run = configs[name]
        model.zero_grad(set_to_none=True)
        sync(dev)
        t = time.perf_counter()
        with torch.autocast(dev, amp_dtype, enabled=amp_dtype is not None):
            out, outs = run(model, pixels)
            preds = adapters.hf_route_predictions(model, outs, out)
            loss = criterion(preds, targets)["loss"]
        loss.backward()
        sync(dev)
        return time.perf_counter() - t

    step("unwrapped")  # first calls build kernels and caches outside the counts
    for name in configs:
        step(name)
    counts = {name: count_step(lambda n=name: step(n)) for name in configs}
    busy = {name: gpu_busy_ms(lambda n=name: step(n)) for name in configs} if cuda else {}
    ops0, reads0 = counts["unwrapped"]
    print(f"one train step, batch {batch}, {size}x{size}, {dev}, amp {args.amp}: ATen operations "
          "(kernel launches on a GPU) and host reads (synchronisations on a GPU)")  # fmt: skip
    for name, (ops, reads) in counts.items():
        gpu = (
            f"   GPU busy {busy[name]:7.1f} ms (x{busy[name] / busy['unwrapped']:.2f})"
            if busy
            else ""
        )
        print(f"  {name:18s} ops {ops:6d} (x{ops / ops0:.3f})   host reads {reads:4d} "
              f"({reads - reads0:+d}){gpu}")  # fmt: skip
    if args.counts_only:
        return

    with torch.no_grad():  # the reference way computes what the adapter computes
        got = adapter_outputs(wrapped, pixels)[1].hidden_states
        want = reference_outputs(ref_model, aux, pixels)[1].hidden_states
    agree = torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    print(f"  adapter routes == reference-way routes (fp32 tolerance): {agree}", flush=True)
    inputs = _decoder_inputs(plain, pixels)
    decoder_one = _decoder_seconds(plain, inputs, args.warmup, args.reps, dev)
    decoder_all = _decoder_seconds(wrapped, inputs, args.warmup, args.reps, dev)
    times = {name: [] for name in configs}
    for rep in range(args.warmup + args.reps):
        for name in configs:
            dt = step(name)
            print(f"  rep {rep} {name}: {dt * 1e3:.0f} ms", flush=True)
            if rep >= args.warmup:
                times[name].append(dt)
    base = statistics.median(times["unwrapped"])
    malloc = "tuned" if tuned else "defaults"
    where = f"CUDA amp {args.amp}" if cuda else f"CPU {args.threads} threads, glibc malloc {malloc}"
    print(f"HF Deformable-DETR ({args.backbone} backbone) 6+6 layers d256, 300 queries, "
          f"batch {batch}, {size}x{size}, {where}; train step (forward + criterion + "
          f"backward), median of {args.reps} after {args.warmup} warm-up")  # fmt: skip
    for name, ts in times.items():
        med = statistics.median(ts)
        paired = statistics.median(t / u for t, u in zip(ts, times["unwrapped"], strict=True))
        print(f"  {name:18s} {med * 1e3:8.0f} ms   x{med / base:5.2f} (medians)   "
              f"x{paired:5.2f} (per-repetition ratios, median)")  # fmt: skip
    extra = (decoder_all - decoder_one) / base
    print(f"  decoder alone, forward + backward: unwrapped {decoder_one * 1e3:.0f} ms "
          f"({decoder_one / base:.2f} of the unwrapped step), 3 routes packed "
          f"{decoder_all * 1e3:.0f} ms (x{decoder_all / decoder_one:.2f}); the routes' extra "
          f"decoder time = {extra:.2f} of the unwrapped step, "
          f"so the adapter's floor is x{1 + extra:.2f}")  # fmt: skip
    if "unwrapped + fast" not in times:
        return
    fast_ratio = statistics.median(times["unwrapped"]) / statistics.median(
        times["unwrapped + fast"]
    )
    print(
        f"  use_fast_deformable_attention speed-up of the unwrapped train step: x{fast_ratio:.2f}"
    )


if __name__ == "__main__":
    main()
