"""The CPU kernel's gather-then-accumulate paths against the fp64 reference.

The forward accumulates channels in register blocks of 16 with a remainder block; the backward
computes the location and weight gradients over ranges of (batch, query, head) tasks and fills the
value gradient chunk by chunk of pixels from recorded updates, in waves of tasks: shapes here
exercise remainders (D around the block width), many levels and points, thread-chunk and
pixel-chunk boundaries, several waves, and points exactly on pixel centres and map borders.
"""

from __future__ import annotations

import pytest
import torch
from _msda import make_inputs

from mrdetr.ops import ms_deform_attn, ms_deform_attn_reference

LEVELS = ((5, 7), (3, 4), (2, 2), (1, 3), (4, 1), (6, 5))  # six levels, 1-pixel rows/columns


def check_against_reference(value, ss, lsi, loc, attn, tol, loc_mask=None):
    """Forward and all three gradients of the CPU kernel vs the fp64 reference."""
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    grad_out = grad_out.to(value.dtype)
    results = []
    for fn, cast in (
        (ms_deform_attn, lambda t: t),
        (ms_deform_attn_reference, torch.Tensor.double),
    ):
        leaves = [cast(t).detach().clone().requires_grad_() for t in (value, loc, attn)]
        kwargs = {"backend": "cpu"} if fn is ms_deform_attn else {}
        out = fn(leaves[0], ss, lsi, leaves[1], leaves[2], **kwargs)
        out.backward(cast(grad_out))
        results.append([out.detach(), *(t.grad for t in leaves)])
    scale = torch.stack([ss[:, 1], ss[:, 0]], -1).double()[None, None, None, :, None, :]
    for name, a, e in zip(("out", "value", "loc", "attn"), *results, strict=True):
        a, e = a.double(), e.double()
        if name == "loc":  # per pixel, and only where the gradient is continuous
            a, e = a / scale, e / scale
            if loc_mask is not None:
                a, e = a[loc_mask], e[loc_mask]
        bound = tol * e.abs().clamp_min(1.0)
        assert ((a - e).abs() <= bound).all(), f"{name}: max error {(a - e).abs().max():.3g}"


@pytest.mark.parametrize("dim", [1, 5, 15, 16, 17, 31, 33, 48])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channel_blocks_and_remainders(dim, dtype):
    inputs = make_inputs(queries=19, heads=3, dim=dim, levels=LEVELS, points=5, dtype=dtype)
    check_against_reference(*inputs, tol=1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_remainder_accumulates_in_fp32(dtype):
    """Half inputs, D = 21 (a full block and a remainder): fp32 accumulation over 60 points."""
    inputs = make_inputs(queries=9, heads=2, dim=21, levels=LEVELS, points=10, dtype=dtype)
    check_against_reference(*inputs, tol=1e-2 if dtype == torch.float16 else 5e-2)


def test_points_on_pixel_centres_and_map_borders():
    """x (and y) = -1, -0.5, 0, 0.5, w-1, w-0.5, w in pixel units: pixel centres, the map's edges
    and the exact borders past which a point samples nothing."""
    levels = ((4, 6), (3, 5))
    value, ss, lsi, _, attn = make_inputs(queries=7, heads=2, dim=17, levels=levels, points=7)
    g = torch.Generator().manual_seed(1)
    sizes = ss.flip(-1).double()  # [L, 2] as (w, h)
    loc = torch.empty(2, 7, 2, 2, 7, 2, dtype=torch.float64)
    for level, (w, h) in enumerate(sizes.tolist()):
        for axis, n in enumerate((w, h)):
            # outside border, map edge, first centre, between, last centre, map edge, border
            coords = torch.tensor([-1.0, -0.5, 0.0, 0.5, n - 1.0, n - 0.5, n], dtype=torch.float64)
            pick = torch.randint(0, 7, (2, 7, 2, 7), generator=g)
            loc[:, :, :, level, :, axis] = (coords[pick] + 0.5) / n
    # the location gradient jumps at integer pixel coordinates (the bilinear cell changes):
    # compare it only at the half-integer ones (map edges, between centres)
    pixel = loc * sizes[None, None, None, :, None, :] - 0.5
    kink = (pixel - pixel.round()).abs() < 1e-9
    check_against_reference(value, ss, lsi, loc, attn, tol=1e-10, loc_mask=~kink)


def test_forward_identical_across_thread_counts_and_chunk_boundaries():
    """Rows split over threads in chunks (grain 16): 37 queries x 2 images cross chunk edges."""
    value, ss, lsi, loc, attn = make_inputs(queries=37, heads=4, dim=20, dtype=torch.float32)
    outs, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(ms_deform_attn(value, ss, lsi, loc, attn, backend="cpu"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    expected = ms_deform_attn_reference(value.double(), ss, lsi, loc.double(), attn.double())
    torch.testing.assert_close(outs[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_large_value_gradient_is_exact_zero_away_from_samples():
    """A 16 MiB value gradient (built on huge-page-advised memory): every pixel no point touches
    is exactly zero, the touched ones match the reference."""
    value, ss, lsi, loc, attn = make_inputs(
        batch=1, queries=6, heads=2, dim=32, levels=((128, 256),), points=4, spread=0.0
    )
    check_against_reference(value, ss, lsi, loc, attn, tol=1e-10)
    leaves = value.clone().requires_grad_()
    ms_deform_attn(leaves, ss, lsi, loc, attn, backend="cpu").sum().backward()
    touched = leaves.grad.abs().sum((0, 2, 3)) > 0  # [S]
    assert 0 < int(touched.sum()) <= 6 * 2 * 4 * 4
    assert leaves.grad.nbytes >= 16 * 2**20


def _cpu_gradients(inputs, grad_out, threads):
    """Value, location and weight gradients of the CPU kernel run with ``threads`` threads."""
    value, ss, lsi, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], backend="cpu").backward(grad_out)
    finally:
        torch.set_num_threads(before)
    return [t.grad for t in leaves]


def test_backward_bitwise_identical_across_thread_counts_and_pixel_chunks():
    """The value gradient is filled in chunks of 256 KiB of pixels (1024 pixels here, so about
    7 per image) from per-thread update lists: 1, 2 and 3 threads (whose task ranges split an
    image) give the same bits, and the bits match the reference. Points are packed into a small
    window, so most rows receive updates from several threads' ranges."""
    levels = ((80, 64), (40, 32), (20, 16), (5, 3))
    inputs = make_inputs(queries=50, heads=2, dim=32, levels=levels, points=4, spread=-0.3)
    inputs = [t.float() if t.is_floating_point() else t for t in inputs]
    grad_out = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(3))
    runs = [_cpu_gradients(inputs, grad_out, threads) for threads in (1, 2, 3, 2)]
    for run in runs[1:]:
        for a, e in zip(run, runs[0], strict=True):
            assert torch.equal(a, e)
    check_against_reference(*inputs, tol=1e-4)


def test_backward_in_several_waves_of_tasks():
    """512 points per (query, head): the backward records at most 2^21 value-gradient updates at
    once, so these 1200 tasks run in two waves (the second adds to chunks the first zeroed)."""
    levels = ((9, 11), (5, 6), (3, 3), (2, 1))
    inputs = make_inputs(batch=1, queries=300, heads=4, dim=3, levels=levels, points=128)
    check_against_reference(*inputs, tol=1e-10)
    grad_out = torch.randn(1, 300, 12, dtype=torch.float64)
    one, two = (_cpu_gradients(inputs, grad_out, threads) for threads in (1, 2))
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_zero_channels_give_zero_location_and_weight_gradients():
    """D = 0: nothing to sample, so the (uninitialised, then filled) gradients are exact zeros."""
    value, ss, lsi, loc, attn = make_inputs(dim=0)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], backend="cpu")
    assert out.shape == (2, 5, 0)
    out.sum().backward()
    for leaf in leaves:
        assert leaf.grad.shape == leaf.shape
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))
