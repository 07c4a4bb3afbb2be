"""``spatial_shapes_list``: the op with host level shapes reads nothing from the device."""

from __future__ import annotations

import re

import pytest
import torch
from _msda import make_inputs
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mrdetr.layers import MultiScaleDeformableAttention
from mrdetr.ops import ms_deform_attn, ms_deform_attn_reference

LEVELS = ((6, 9), (3, 5), (1, 2))
ALL = ["pytorch", "cpu"]

# Tensor methods that copy data to the host (seen by a TorchFunctionMode; on CPU tensors
# `tolist` dispatches no ATen op at all, so a dispatch mode alone would miss it).
_HOST_METHODS = {"tolist", "item", "numpy", "__int__", "__float__", "__bool__", "__index__"}
# ATen ops that force a device-to-host read.
_HOST_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero"}


class _CountHostReads(TorchFunctionMode):
    """Count host reads in the block: host-copying Tensor methods, and (with _CountOps) the ATen
    ops that read a value on the host or copy a tensor to the CPU."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_METHODS:
            self.reads.append(name)
        src = args[0] if args else None
        if name in ("cpu", "to") and isinstance(src, torch.Tensor) and src.device.type != "cpu":
            if name == "cpu" or "cpu" in str(args[1:]) + str(kwargs or {}):
                self.reads.append(f"{name}(cpu)")
        return func(*args, **(kwargs or {}))


class _CountOps(TorchDispatchMode):
    def __init__(self, reads: list[str]):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _HOST_OPS:
            self.reads.append(name)
        if name in ("aten::_to_copy", "aten::copy_") and "cpu" in str(kwargs or {}) + str(args):
            src = args[1] if name == "aten::copy_" else args[0]
            if isinstance(src, torch.Tensor) and src.device.type != "cpu":
                self.reads.append(name)
        return func(*args, **(kwargs or {}))


def host_reads(fn) -> list[str]:
    """Run ``fn()`` and return the host reads it made (names, in order)."""
    counter = _CountHostReads()
    with counter, _CountOps(counter.reads):
        fn()
    return counter.reads


def _forward_backward(backend, ss, lsi, shapes_list):
    value, _, _, loc, attn = make_inputs(levels=LEVELS)
    leaves = [t.requires_grad_() for t in (value, loc, attn)]

    def run():
        out = ms_deform_attn(
            leaves[0], ss, lsi, leaves[1], leaves[2], backend=backend,
            spatial_shapes_list=shapes_list,
        )  # fmt: skip
        out.square().sum().backward()
        run.out = out.detach()

    return leaves, run


def _oracle(leaves):
    """Reference forward and gradients, from separate copies of the leaves."""
    value, ss, lsi, _, _ = make_inputs(levels=LEVELS)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    out = ms_deform_attn_reference(copies[0], ss, lsi, copies[1], copies[2])
    out.square().sum().backward()
    return out.detach(), [c.grad for c in copies]


def test_the_counter_sees_host_reads():
    t = torch.tensor([[3, 4]])
    assert host_reads(lambda: t.tolist()) == ["tolist"]
    assert host_reads(lambda: int(t[0, 0])) == ["__int__", "aten::_local_scalar_dense"]
    assert "aten::nonzero" in host_reads(lambda: t.nonzero())


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("with_tensors", [True, False])
def test_forward_backward_with_the_list_read_nothing(backend, with_tensors):
    _, ss, lsi, _, _ = make_inputs(levels=LEVELS)
    if not with_tensors:
        ss = lsi = None
    leaves, run = _forward_backward(backend, ss, lsi, [list(hw) for hw in LEVELS])
    ms_deform_attn(*make_inputs(levels=LEVELS), backend=backend)  # build/load outside the count
    assert host_reads(run) == []
    expected, grads = _oracle(leaves)
    torch.testing.assert_close(run.out, expected, rtol=0, atol=1e-12)
    for leaf, grad in zip(leaves, grads, strict=True):
        torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ALL)
def test_tensors_only_read_once_per_call(backend):
    _, ss, lsi, _, _ = make_inputs(levels=LEVELS)
    leaves, run = _forward_backward(backend, ss, lsi, None)
    ms_deform_attn(*make_inputs(levels=LEVELS), backend=backend)
    assert host_reads(run) == ["tolist"]  # both level tensors in one copy
    expected, _ = _oracle(leaves)
    torch.testing.assert_close(run.out, expected, rtol=0, atol=1e-12)


def test_module_passes_the_list_on():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(8, num_heads=2, num_levels=3, num_points=2).double()
    value, ss, lsi, _, _ = make_inputs(levels=LEVELS)
    query = torch.randn(2, 5, 8, dtype=torch.float64)
    memory = torch.randn(2, value.shape[1], 8, dtype=torch.float64)
    ref = torch.rand(2, 5, 3, 2, dtype=torch.float64)
    expected = module(query, ref, memory, ss, lsi)
    outs = []
    reads = host_reads(
        lambda: outs.append(module(query, ref, memory, ss, lsi, spatial_shapes_list=LEVELS))
    )
    assert reads == []
    torch.testing.assert_close(outs[0], expected, rtol=0, atol=1e-12)


def _bad_lists():
    return [
        ("length", ValueError, "must have L=3 levels", [(6, 9), (3, 5)]),
        ("not pairs", TypeError, "list of (h, w) int pairs", [(6, 9), (3, 5), 2]),
        ("floats", TypeError, "list of (h, w) int pairs", [(6, 9), (3, 5), (1.0, 2)]),
        ("tensor", TypeError, "list of (h, w) int pairs", torch.tensor(LEVELS)),
        ("negative", ValueError, "spatial_shapes_list must be positive", [(6, 9), (3, -5), (1, 2)]),
        ("sum", ValueError, "spatial_shapes_list sum to sum(h*w)=72", [(6, 9), (3, 5), (1, 3)]),
    ]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", _bad_lists(), ids=lambda c: c[0])
def test_bad_list_raises_naming_it(backend, case):
    _, exc, message, shapes = case
    value, ss, lsi, loc, attn = make_inputs(levels=LEVELS)
    with pytest.raises(exc, match=re.escape(message)):
        ms_deform_attn(value, ss, lsi, loc, attn, backend=backend, spatial_shapes_list=shapes)
    if case[0] != "length":  # the same list without tensors fails the same way
        with pytest.raises(exc):
            ms_deform_attn(
                value, None, None, loc, attn, backend=backend, spatial_shapes_list=shapes
            )


def test_missing_tensors_without_list_raise():
    value, ss, lsi, loc, attn = make_inputs(levels=LEVELS)
    with pytest.raises(
        TypeError, match="spatial_shapes must be a Tensor unless spatial_shapes_list"
    ):
        ms_deform_attn(value, None, lsi, loc, attn)


@pytest.mark.parametrize("with_tensors", [True, False])
def test_torch_compile_fullgraph_with_the_list(with_tensors):
    value, ss, lsi, loc, attn = make_inputs(levels=LEVELS, dtype=torch.float32)
    if not with_tensors:
        ss = lsi = None

    def fn(v, sl, a):
        out = ms_deform_attn(
            v, ss, lsi, sl.sigmoid(), a, backend="auto", spatial_shapes_list=list(LEVELS)
        )
        return out.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    eager = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out, expected = compiled(*leaves), fn(*eager)
    out.backward()
    expected.backward()
    torch.testing.assert_close(out, expected)
    for a, e in zip(leaves, eager, strict=True):
        torch.testing.assert_close(a.grad, e.grad)


def test_torch_export_with_the_list():
    value, ss, lsi, loc, attn = make_inputs(levels=LEVELS, dtype=torch.float32)

    class Attn(torch.nn.Module):
        def forward(self, v, sl, a):
            return ms_deform_attn(v, None, None, sl, a, spatial_shapes_list=list(LEVELS))

    program = torch.export.export(Attn(), (value, loc, attn))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "mrdetr.ms_deform_attn_forward.default" in targets
    expected = ms_deform_attn_reference(value, ss, lsi, loc, attn)
    torch.testing.assert_close(program.module()(value, loc, attn), expected)
