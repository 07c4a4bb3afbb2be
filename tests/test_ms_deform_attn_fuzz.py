"""Property-based fuzzing of ms_deform_attn (hypothesis), on every available compiled backend.

Valid but extreme inputs (empty batches, 1-pixel levels, non-contiguous and zero-stride views,
points far outside the maps, +-inf) must match the reference in the output and every gradient.
Invalid inputs must raise a Python exception, never crash the process: those run in a child.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mrdetr.ops import ms_deform_attn, ms_deform_attn_reference  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SPECIAL = [0.0, 1.0, 0.5, -0.25, 1.25, 1e30, -1e30, 3e38, float("inf"), -float("inf")]


@st.composite
def valid_inputs(draw):
    b, q = draw(st.integers(0, 2)), draw(st.integers(0, 4))
    h, d = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    shapes = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3))
    nl, p = len(shapes), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.int64)
    sizes = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    loc = torch.rand(b, q, h, nl, p, 2, generator=g, dtype=torch.float64) * 2.4 - 0.7
    n_special = draw(st.integers(0, 4))
    flat = loc.view(-1)
    for _ in range(n_special if flat.numel() else 0):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIAL))
    # x = loc * w - 0.5 == -1 exactly is the one point where grid_sample's gradient differs
    # (it differentiates the zero-weight corner): nudge such points off it
    size = torch.stack([ss[:, 1], ss[:, 0]], -1).double()[:, None]  # [L, 1, 2] as (x, y)
    loc = torch.where(loc * size - 0.5 == -1, loc + 1e-3, loc)
    attn = torch.rand(b, q, h, nl, p, generator=g, dtype=torch.float64)
    layout = draw(st.sampled_from(["contiguous", "strided", "expanded", "transposed"]))
    if layout == "strided":
        value = torch.randn(b, s, h, 2 * d, generator=g, dtype=torch.float64)[..., ::2]
    elif layout == "expanded" and b > 0:
        value = torch.randn(1, s, h, d, generator=g, dtype=torch.float64).expand(b, s, h, d)
    elif layout == "transposed":
        value = torch.randn(b, s, d, h, generator=g, dtype=torch.float64).transpose(2, 3)
        loc = loc.transpose(0, 1).contiguous().transpose(0, 1)
        ss = ss.t().contiguous().t()
    else:
        value = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    return value, ss, lsi, loc, attn


def _forward_backward(fn, value, ss, lsi, loc, attn):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], ss, lsi, leaves[1], leaves[2])
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    out.backward(g.to(out.device))
    return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(inputs=valid_inputs())
def test_valid_extreme_inputs_match_reference(device, inputs):
    expected = _forward_backward(ms_deform_attn_reference, *inputs)
    value, ss, lsi, loc, attn = (t.to(device) for t in inputs)
    got = _forward_backward(
        lambda *a: ms_deform_attn(*a, backend=device), value, ss, lsi, loc, attn
    )
    for name, a, e in zip(("out", "value", "loc", "attn"), got, expected, strict=True):
        assert a.shape == e.shape, name
        assert a.isfinite().all(), name  # no NaN in: none out, whatever the magnitudes
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=name)


# The child draws invalid calls (wrong ranks, sizes, dtypes, devices, levels that do not fit in
# value, L = 0, non-tensors) through the public op, which must raise ValueError/TypeError, and
# the same tensors straight into torch.ops.mrdetr.*, which must raise or return, never crash.
INVALID_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from hypothesis import given, settings, strategies as st, HealthCheck
    from mrdetr.ops import ms_deform_attn
    device = sys.argv[1]
    stats = {"public": 0, "direct_raised": 0, "direct_returned": 0}

    def base(b, q, h, d, shapes, p):
        ss = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
        sizes = (ss[:, 0] * ss[:, 1]).clamp(0, 64)
        lsi = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])[: len(shapes)]
        s = int(sizes.sum()) if len(shapes) else 4
        value = torch.randn(b, s, h, d, dtype=torch.float64)
        loc = torch.rand(b, q, h, len(shapes), p, 2, dtype=torch.float64)
        attn = torch.rand(b, q, h, len(shapes), p, dtype=torch.float64)
        return [value, ss, lsi, loc, attn]

    MUTATIONS = ["shape_value", "negative_hw", "zero_hw", "huge_hw", "start_negative",
                 "start_past_end", "S_short", "L_zero", "rank", "dtype_int", "dtype_mix",
                 "not_tensor", "loc_levels", "overflow_hw"]

    @settings(max_examples=int(sys.argv[2]), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 2), st.integers(1, 4),
           st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
           st.integers(1, 2), st.sampled_from(MUTATIONS), st.integers(0, 2), st.data())
    def run(b, q, h, d, shapes, p, mutation, which, data):
        args = base(b, q, h, d, shapes, p)
        value, ss, lsi, loc, attn = args
        lvl = which % len(shapes)
        if mutation == "shape_value":
            args[0] = value[:, :, :, None]
        elif mutation == "negative_hw":
            ss[lvl, which % 2] = -data.draw(st.integers(1, 10**6))
        elif mutation == "zero_hw":
            ss[lvl, which % 2] = 0
        elif mutation == "huge_hw":
            ss[lvl] = torch.tensor([data.draw(st.integers(10**3, 10**9))] * 2)
        elif mutation == "overflow_hw":
            ss[lvl] = torch.tensor([2**62, 2**62])
        elif mutation == "start_negative":
            lsi[lvl] = -data.draw(st.integers(1, 10**12))
        elif mutation == "start_past_end":
            lsi[lvl] = value.shape[1] + data.draw(st.integers(-ss[lvl].prod().item() + 1, 10**6))
        elif mutation == "S_short":
            args[0] = value[:, : value.shape[1] - 1]
        elif mutation == "L_zero":
            args[1], args[2] = ss[:0], lsi[:0]
            args[3], args[4] = loc[:, :, :, :0], attn[:, :, :, :0]
        elif mutation == "rank":
            args[which + 2] = args[which + 2][0]
        elif mutation == "dtype_int":
            args[1] = ss.int()
        elif mutation == "dtype_mix":
            args[3] = loc.float()
        elif mutation == "not_tensor":
            args[4] = 1.0
        elif mutation == "loc_levels":
            args[3], args[4] = loc[:, :, :, :0], attn[:, :, :, :0]
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        try:
            ms_deform_attn(*args, backend=device)
        except (ValueError, TypeError):
            stats["public"] += 1
        else:
            raise AssertionError(f"{mutation}: the public op accepted invalid input")
        for op in ("forward", "backward"):
            try:
                if op == "forward":
                    torch.ops.mrdetr.ms_deform_attn_forward(*args)
                else:
                    grad = torch.ones(b, q, h * d, dtype=torch.float64, device=device)
                    torch.ops.mrdetr.ms_deform_attn_backward(grad, *args)
            except (RuntimeError, ValueError, TypeError, IndexError):
                stats["direct_raised"] += 1
            else:
                stats["direct_returned"] += 1

    ms_deform_attn(*base(1, 1, 1, 1, [(1, 1)], 1), backend=device)  # build/load the kernels
    run()
    print(json.dumps(stats))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_invalid_inputs_raise_and_never_crash(device):
    proc = subprocess.run(
        [sys.executable, "-c", INVALID_CHILD, device, "80"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],  # the checkout's mrdetr
    )
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-3000:]}"
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["public"] == 80, stats
    assert stats["direct_raised"] > 0, stats
