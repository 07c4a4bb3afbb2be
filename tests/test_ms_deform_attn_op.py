"""Compiled ms_deform_attn kernels vs the PyTorch reference; gradcheck, opcheck, compile."""

from __future__ import annotations

import pytest
import torch
from _msda import BACKENDS, make_inputs

from mrdetr.ops import ms_deform_attn, ms_deform_attn_reference

TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def assert_close_rel(actual, expected, tol):
    """|actual - expected| <= tol * max(|expected|, 1), elementwise (fp64 comparison)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    err = (actual - expected).abs()
    bound = tol * expected.abs().clamp_min(1.0)
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, (
        f"max error {err.max().item():.3g} exceeds tol {tol} (relative to max(|x|,1))"
    )


def grads(fn, value, loc, attn, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], leaves[1], leaves[2])
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_forward_and_backward_match_reference(backend, dtype):
    """Kernel vs the fp64 reference evaluated on the same (rounded) inputs, with points outside
    the maps, non-square levels and a 1-pixel-high level."""
    value, ss, lsi, loc, attn = make_inputs(dtype=dtype, device=backend, queries=7, dim=8)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    grad_out = grad_out.to(device=backend, dtype=dtype)

    def kernel(v, sl, a):
        return ms_deform_attn(v, ss, lsi, sl, a, backend=backend)

    def reference(v, sl, a):
        return ms_deform_attn_reference(v.double(), ss, lsi, sl.double(), a.double())

    out, g = grads(kernel, value, loc, attn, grad_out)
    ref_out, ref_g = grads(reference, value, loc, attn, grad_out.double())
    assert out.dtype == dtype and out.shape == ref_out.shape
    tol = TOLERANCES[dtype]
    assert_close_rel(out, ref_out, tol)
    # location gradients scale with the map size (d loc -> d pixel = w or h): compare per pixel
    scale = torch.stack([ss[:, 1], ss[:, 0]], -1).double().cpu()[None, None, None, :, None, :]
    for name, a, e in zip(("value", "loc", "attn"), g, ref_g, strict=True):
        a, e = a.double().cpu(), e.double().cpu()
        if name == "loc":
            a, e = a / scale, e / scale
        assert a.dtype == torch.float64, name
        assert_close_rel(a, e, tol * 2)


def test_points_outside_sample_zero_and_pixel_centres_are_exact():
    """Hand-made case: a point at a pixel centre returns that pixel; far-away points give zero."""
    value, ss, lsi, loc, attn = make_inputs(batch=1, queries=2, heads=1, dim=3, points=1)
    loc = torch.zeros_like(loc)
    attn = torch.zeros_like(attn)
    h, w = ss[0].tolist()
    y, x = 2, 5
    loc[0, 0, 0, 0, 0] = torch.tensor([(x + 0.5) / w, (y + 0.5) / h], dtype=loc.dtype)
    attn[0, 0, 0, 0, 0] = 2.0
    loc[0, 1, 0, :, 0] = torch.tensor([-0.6, 1.7], dtype=loc.dtype)  # outside every level
    attn[0, 1] = 1.0
    out = ms_deform_attn(value, ss, lsi, loc, attn, backend="cpu")
    torch.testing.assert_close(out[0, 0], 2.0 * value[0, y * w + x, 0], rtol=0, atol=1e-12)
    assert out[0, 1].abs().max().item() == 0.0


@pytest.mark.parametrize("dim", [1, 3, 32, 64, 71, 96, 1024])
def test_gradcheck_float64(dim):
    """gradcheck of value, locations and weights; fast mode (random projections) for wide D."""
    small = dim <= 32
    value, ss, lsi, loc, attn = make_inputs(
        batch=2 if small else 1,
        queries=3 if small else 2,
        heads=2 if small else 1,
        dim=dim,
        levels=((4, 5), (2, 3)),
        points=2,
        seed=dim,
    )
    leaves = [t.requires_grad_() for t in (value, loc, attn)]

    def fn(v, sl, a):
        return ms_deform_attn(v, ss, lsi, sl, a, backend="cpu")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=not small)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    value, ss, lsi, loc, attn = make_inputs(dtype=torch.float32, device=backend)
    ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)  # builds and registers the op
    fwd = torch.ops.mrdetr.ms_deform_attn_forward.default
    for requires_grad in (False, True):
        args = (value, ss, lsi, loc, attn)
        if requires_grad:
            args = (value.clone().requires_grad_(), ss, lsi, loc.clone().requires_grad_(), attn)
        torch.library.opcheck(fwd, args)
    grad_out = torch.randn(2, loc.shape[1], value.shape[2] * value.shape[3], device=backend)
    bwd = torch.ops.mrdetr.ms_deform_attn_backward.default
    torch.library.opcheck(bwd, (grad_out, value, ss, lsi, loc, attn))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    value, ss, lsi, loc, attn = make_inputs(dtype=torch.float32, device=backend)
    proj = torch.nn.Linear(value.shape[-1], value.shape[-1]).to(backend)

    def fn(v, sl, a):
        return ms_deform_attn(proj(v), ss, lsi, sl.sigmoid(), a.softmax(-1), backend="auto").sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    eager_leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = compiled(*leaves)
    out.backward()
    expected = fn(*eager_leaves)
    expected.backward()
    torch.testing.assert_close(out, expected)
    for a, e in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, e.grad)


def test_cpu_backward_is_deterministic_across_thread_counts():
    """Many queries hit the same pixels: the value gradient must not depend on the run."""
    value, ss, lsi, loc, attn = make_inputs(queries=400, heads=4, dim=16, levels=((3, 3),))
    value.requires_grad_()
    results = []
    for threads in (1, 2, 2):
        torch.set_num_threads(threads)
        value.grad = None
        ms_deform_attn(value, ss, lsi, loc, attn, backend="cpu").sum().backward()
        results.append(value.grad.clone())
    torch.set_num_threads(2)
    assert all(torch.equal(results[0], r) for r in results[1:])


NAN, INF = float("nan"), float("inf")


def _non_finite_case(dtype):
    """Inputs with one non-finite entry per query row (batch 1, one head, two levels)."""
    value, ss, lsi, loc, attn = make_inputs(
        batch=1, queries=9, heads=1, dim=3, levels=((4, 5), (2, 3)), points=2, spread=0.0
    )
    loc, attn, value = loc.clone(), attn.clone(), value.clone()
    value[0, 20, 0, 1] = NAN  # pixel (0, 0) of level 1, channel 1
    loc[0, :8, 0, 1, :, 0].clamp_(min=0.8)  # rows 0-7 never read that pixel, row 8 does:
    loc[0, 8, 0, 1, 0] = torch.tensor([0.5 / 3, 0.5 / 2], dtype=loc.dtype)  # its centre
    loc[0, 0, 0, 0, 0, 0] = NAN  # NaN location, x only
    loc[0, 1, 0, 1, 1] = NAN  # NaN location, both coordinates
    loc[0, 2, 0, 0, 0, 0] = INF
    loc[0, 3, 0, 1, 0, 1] = -INF
    loc[0, 4, 0, 0, 1, 0] = 3e38  # 2 * 3e38 overflows fp32
    loc[0, 5, 0, 1, 1] = torch.tensor([-3e38, 1e30], dtype=loc.dtype)
    attn[0, 6, 0, 0, 0] = NAN  # NaN weight of a point inside the map
    attn[0, 7, 0, 1, 1] = NAN  # NaN weight of a point outside the map
    loc[0, 7, 0, 1, 1] = torch.tensor([1.9, -0.7], dtype=loc.dtype)
    loc[0, 6, 0, 0, 0] = torch.tensor([0.3, 0.4], dtype=loc.dtype)  # inside level 0
    return [t.to(dtype) for t in (value, loc, attn)], ss, lsi


def _run(backend, ss, lsi, value, loc, attn):
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    if backend == "reference":
        out = ms_deform_attn_reference(leaves[0], ss, lsi, leaves[1], leaves[2])
    else:
        out = ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], backend=backend)
    out.backward(torch.ones_like(out))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["pytorch", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_inputs_follow_one_rule(backend, dtype):
    """NaN (location, weight or value) propagates; a non-NaN point outside the map, +-inf and
    3e38 included, samples zeros. Oracle: the same call with those points' weights set to zero
    and their locations made finite, which is what "samples zeros" means."""
    (value, loc, attn), ss, lsi = _non_finite_case(dtype)
    device = "cuda" if backend == "cuda" else "cpu"
    ss, lsi = ss.to(device), lsi.to(device)
    value, loc, attn = (t.to(device) for t in (value, loc, attn))
    out, (g_value, g_loc, g_attn) = _run(backend, ss, lsi, value, loc, attn)
    out, g_value, g_loc, g_attn = (t.cpu() for t in (out, g_value, g_loc, g_attn))

    nan_rows = {0, 1, 6, 7}
    for q in range(9):
        if q in nan_rows:
            assert out[0, q].isnan().all(), q
        elif q == 8:
            assert out[0, q].isnan().tolist() == [False, True, False]
        else:
            assert out[0, q].isfinite().all(), q
    # the oracle for the infinite / huge rows: weight 0 at a finite location
    o_loc, o_attn = loc.clone(), attn.clone()
    for q, lvl, p in ((2, 0, 0), (3, 1, 0), (4, 0, 1), (5, 1, 1)):
        o_loc[0, q, 0, lvl, p] = 0.5
        o_attn[0, q, 0, lvl, p] = 0.0
    expected = ms_deform_attn_reference(value.double(), ss, lsi, o_loc.double(), o_attn.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out[0, 2:6].double(), expected[0, 2:6].cpu(), rtol=tol, atol=tol)
    # gradients: NaN for the NaN points, zero location gradient outside the map
    assert g_attn[0, 0, 0, 0, 0].isnan() and g_attn[0, 1, 0, 1, 1].isnan()
    assert g_loc[0, 0, 0, 0, 0].isnan().any() and g_loc[0, 1, 0, 1, 1].isnan().any()
    assert g_loc[0, 6, 0, 0, 0].isnan().any(), "NaN weight inside the map: NaN location grad"
    for q, lvl, p in ((2, 0, 0), (3, 1, 0), (4, 0, 1), (5, 1, 1), (7, 1, 1)):
        assert (g_loc[0, q, 0, lvl, p] == 0).all(), (q, lvl, p)
    assert g_loc[0, 2:6].isfinite().all() and g_attn[0, 2:6].isfinite().all()
    assert g_attn[0, 8, 0, 1, 0].isnan(), "a NaN pixel read by a point: NaN weight gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_kernels_agree_with_reference(backend, dtype):
    """Same NaN pattern as the reference in the output and every gradient."""
    (value, loc, attn), ss, lsi = _non_finite_case(dtype)
    ref = _run("reference", ss, lsi, value, loc, attn)
    got = _run(
        backend, ss.to(backend), lsi.to(backend), *(t.to(backend) for t in (value, loc, attn))
    )
    pairs = [(ref[0], got[0]), *zip(ref[1], got[1], strict=True)]
    for name, (e, a) in zip(("out", "value", "loc", "attn"), pairs, strict=True):
        a = a.cpu()
        if name == "loc":  # grid_sample leaves one coordinate's gradient at 0 for a NaN point
            e, a = e.isnan().any(-1), a.isnan().any(-1)
            assert torch.equal(e, a), name
            continue
        assert torch.equal(e.isnan(), a.isnan()), name
        torch.testing.assert_close(a.nan_to_num(), e.nan_to_num(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_instead_of_returning_zeros(backend):
    """create_graph=True works for first derivatives; a second derivative raises clearly."""
    value, ss, lsi, loc, attn = make_inputs(device=backend)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], backend=backend)
    first = torch.autograd.grad((out**2).sum(), leaves, create_graph=True)
    ref_leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref_out = ms_deform_attn_reference(ref_leaves[0], ss, lsi, ref_leaves[1], ref_leaves[2])
    ref_first = torch.autograd.grad((ref_out**2).sum(), ref_leaves, create_graph=True)
    for a, e in zip(first, ref_first, strict=True):
        torch.testing.assert_close(a, e)
    assert ref_first[0].grad_fn is not None  # the reference does differentiate twice
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(first[1].sum(), leaves)
