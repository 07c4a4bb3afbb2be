"""Bad input raises a clear error on every backend; empty and non-contiguous input work."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
from _msda import make_inputs

import mrdetr.ops._dispatch as dispatch
from mrdetr.ops import ms_deform_attn, ms_deform_attn_reference

ALL = ["pytorch", "cpu"]


def _call(backend, value, ss, lsi, loc, attn):
    return ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)


def _bad_cases():
    v, ss, lsi, loc, attn = make_inputs()
    s = v.shape[1]
    return [
        ("value", ValueError, "value must have 4 dims", (v[0], ss, lsi, loc, attn)),
        ("loc rank", ValueError, "sampling_locations must have 6 dims", (v, ss, lsi, loc[0], attn)),
        ("attn shape", ValueError, "attention_weights must be", (v, ss, lsi, loc, attn[..., :1])),
        ("loc heads", ValueError, "sampling_locations must be", (v, ss, lsi, loc[:, :, :1], attn)),
        ("loc xy", ValueError, "sampling_locations must be", (v, ss, lsi, loc[..., :1], attn)),
        ("ss shape", ValueError, "spatial_shapes must be", (v, ss[:, :1], lsi, loc, attn)),
        ("lsi len", ValueError, "level_start_index must be", (v, ss, lsi[:2], loc, attn)),
        ("ss dtype", TypeError, "spatial_shapes must be int64", (v, ss.int(), lsi, loc, attn)),
        (
            "lsi dtype",
            TypeError,
            "level_start_index must be int64",
            (v, ss, lsi.float(), loc, attn),
        ),
        (
            "dtype mix",
            TypeError,
            "sampling_locations must have value's dtype",
            (v, ss, lsi, loc.float(), attn),
        ),
        (
            "int value",
            TypeError,
            "value must be a floating",
            (v.long(), ss, lsi, loc.long(), attn.long()),
        ),
        ("not tensor", TypeError, "attention_weights must be a Tensor", (v, ss, lsi, loc, 1.0)),
        ("lsi values", ValueError, "running sum", (v, ss, lsi + 1, loc, attn)),
        ("S mismatch", ValueError, f"S={s - 1}", (v[:, :-1], ss, lsi, loc, attn)),
        ("negative shape", ValueError, "must be positive", (v, -ss, lsi, loc, attn)),
        ("meta device", ValueError, "is on meta", (v, ss, lsi, loc.to("meta"), attn)),
        (
            "no levels",
            ValueError,
            "at least one level",
            (v, ss[:0], lsi[:0], loc[:, :, :, :0], attn[:, :, :, :0]),
        ),
    ]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_before_any_kernel(backend, case):
    _, exc, message, args = case
    with (
        mock.patch.object(dispatch, "ms_deform_attn_reference") as ref,
        mock.patch.object(dispatch, "_resolve_backend") as resolve,
    ):
        with pytest.raises(exc, match=re.escape(message)):
            _call(backend, *args)
    ref.assert_not_called()
    resolve.assert_not_called()


def test_unknown_backend_and_device_mismatch():
    args = make_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        ms_deform_attn(*args, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' needs inputs on a cuda device"):
        ms_deform_attn(*args, backend="cuda")


def test_env_var_overrides_auto(monkeypatch):
    args = make_inputs()
    monkeypatch.setenv("MRDETR_BACKEND", "pytorch")
    with mock.patch.object(
        dispatch, "ms_deform_attn_reference", wraps=ms_deform_attn_reference
    ) as ref:
        ms_deform_attn(*args)
        assert ref.call_count == 1
        ms_deform_attn(*args, backend="cpu")  # an explicit backend wins over the variable
        assert ref.call_count == 1
    monkeypatch.setenv("MRDETR_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MRDETR_BACKEND must be one of"):
        ms_deform_attn(*args)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("batch, queries", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_and_zero_queries(backend, batch, queries):
    value, ss, lsi, loc, attn = make_inputs(batch=max(batch, 1), queries=max(queries, 1))
    value, loc, attn = value[:batch], loc[:batch, :queries], attn[:batch, :queries]
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], backend=backend)
    assert out.shape == (batch, queries, value.shape[2] * value.shape[3])
    out.sum().backward()
    for leaf in leaves:
        assert leaf.grad.shape == leaf.shape and not leaf.grad.any()


@pytest.mark.parametrize("backend", ALL)
def test_non_contiguous_inputs(backend):
    value, ss, lsi, loc, attn = make_inputs(heads=3, dim=5)
    nc_value = value.transpose(2, 3).contiguous().transpose(2, 3)
    nc_loc = loc.flip(-1).contiguous().flip(-1)
    nc_attn = attn.transpose(0, 1).contiguous().transpose(0, 1)
    nc_ss = torch.stack([ss[:, 0], ss[:, 1]], 1).t().contiguous().t()
    assert not (nc_value.is_contiguous() or nc_attn.is_contiguous() or nc_ss.is_contiguous())
    expected = ms_deform_attn_reference(value, ss, lsi, loc, attn)
    out = ms_deform_attn(nc_value, nc_ss, lsi, nc_loc, nc_attn, backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_validation_sees_in_place_changes():
    """Editing spatial_shapes in place between calls is seen by the next call."""
    value, ss, lsi, loc, attn = make_inputs()
    ms_deform_attn(value, ss, lsi, loc, attn, backend="cpu")
    ss[0, 0] += 1
    with pytest.raises(ValueError, match="running sum"):
        ms_deform_attn(value, ss, lsi, loc, attn, backend="cpu")


# Each case changes the level tensors in a way that a cache keyed by data pointer and _version
# cannot see, or skips the Python checks; it must end in a Python exception, never a crash, so
# every case runs in its own child process.
OOB_CHILD = textwrap.dedent(
    """
    import sys, numpy as np, torch
    sys.path.insert(0, {tests!r})
    from _msda import make_inputs
    from mrdetr.ops import ms_deform_attn
    case, backend = sys.argv[1], sys.argv[2]
    value, ss, lsi, loc, attn = make_inputs(batch=1, queries=3, levels=((4, 5), (2, 3)))
    op = torch.ops.mrdetr.ms_deform_attn_forward
    bwd = torch.ops.mrdetr.ms_deform_attn_backward
    ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)  # a valid call first
    huge = (100000, 100000)
    def call(shapes, starts=lsi):
        return ms_deform_attn(value, shapes, starts, loc, attn, backend=backend)
    try:
        if case == "numpy_reuse":
            buf, st = np.array([[4, 5], [2, 3]]), np.array([0, 20])
            call(torch.from_numpy(buf), torch.from_numpy(st))
            buf[0] = huge  # same address, version 0
            call(torch.from_numpy(buf), torch.from_numpy(st))
        elif case == "data_write":
            ss.data[0] = torch.tensor(huge)
            call(ss)
        elif case == "numpy_write":
            ss.numpy()[1] = huge
            call(ss)
        elif case == "as_strided":
            flat = torch.tensor([4, 5, 2, 3, 100000, 100000])
            call(flat.as_strided((2, 2), (2, 1)))
            call(flat.as_strided((2, 2), (2, 1), 2))
        elif case == "compile":
            fn = torch.compile(lambda v, s, i, l, a: ms_deform_attn(v, s, i, l, a, backend=backend),
                               backend="aot_eager", fullgraph=True)
            fn(value, ss, lsi, loc, attn)
            fn(value, torch.tensor([huge, (2, 3)]), lsi, loc, attn)
        elif case == "direct_huge":
            op(value, torch.tensor([huge, (2, 3)]), lsi, loc, attn)
        elif case == "direct_zero":
            op(value, torch.tensor([(0, 5), (2, 3)]), lsi, loc, attn)
        elif case == "direct_negative_start":
            op(value, ss, torch.tensor([-1000, 20]), loc, attn)
        elif case == "direct_start_past_end":
            op(value, ss, torch.tensor([0, 21]), loc, attn)
        elif case == "direct_overflow":
            op(value, torch.tensor([(2**62, 2**62), (2, 3)]), lsi, loc, attn)
        elif case == "direct_backward":
            g = torch.ones(1, 3, value.shape[2] * value.shape[3], dtype=value.dtype)
            bwd(g, value, torch.tensor([huge, (2, 3)]), lsi, loc, attn)
        else:
            raise SystemExit("unknown case " + case)
    except (ValueError, RuntimeError) as exc:
        print("RAISED", type(exc).__name__, str(exc).splitlines()[0])
    else:
        print("NO ERROR")
    """
)
OOB_CASES = [
    "numpy_reuse",
    "data_write",
    "numpy_write",
    "as_strided",
    "compile",
    "direct_huge",
    "direct_zero",
    "direct_negative_start",
    "direct_start_past_end",
    "direct_overflow",
    "direct_backward",
]


@pytest.mark.parametrize(
    "case, backend",
    [(c, "cpu") for c in OOB_CASES] + [(c, "pytorch") for c in OOB_CASES[:4]],
)
def test_invalid_levels_never_reach_the_kernel(case, backend):
    """The reproducers of the out-of-bounds read (SIGSEGV before the fix): a Python error now."""
    code = OOB_CHILD.format(tests=str(Path(__file__).resolve().parent))
    proc = subprocess.run(
        [sys.executable, "-c", code, case, backend], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert "RAISED ValueError" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "spatial_shapes" in proc.stdout or "level" in proc.stdout, proc.stdout


def test_direct_op_calls_are_checked_in_cpp():
    """Calling the registered op directly skips the Python checks; C++ still refuses bad input."""
    value, ss, lsi, loc, attn = make_inputs()
    ms_deform_attn(value, ss, lsi, loc, attn, backend="cpu")  # loads the op
    op = torch.ops.mrdetr.ms_deform_attn_forward
    with pytest.raises(RuntimeError, match="attention_weights must be"):
        op(value, ss, lsi, loc, attn[..., :1])
    with pytest.raises(RuntimeError, match="must share one dtype"):
        op(value, ss, lsi, loc.float(), attn)
    with pytest.raises(ValueError, match="at least one level"):
        op(value, ss[:0], lsi[:0], loc[:, :, :, :0], attn[:, :, :, :0])
    grad = torch.zeros(2, loc.shape[1], 3, dtype=value.dtype)
    with pytest.raises(RuntimeError, match="grad_output must be"):
        torch.ops.mrdetr.ms_deform_attn_backward(grad, value, ss, lsi, loc, attn)
