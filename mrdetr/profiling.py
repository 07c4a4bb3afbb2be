"""``OpCounter``: count the ATen operations of a block of code and the ones that read the device.

A GPU runs ahead of the Python that launches its kernels until Python needs a value the GPU
computes: ``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``.numpy()``, a copy to the CPU, or
an operation whose output size depends on the data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``).
Each such *host read* waits for the GPU's whole queue (a ``cudaStreamSynchronize``), after which
the GPU idles while Python launches the next kernels.

:class:`OpCounter` counts both, on any device, so the figures taken on the CPU (where nothing
waits) are the host reads a GPU run would make::

    with OpCounter() as count:
        loss = criterion(outputs, targets)["loss"]
    print(count.ops, count.host_reads, count.read_ops)

It is a :class:`~torch.utils._python_dispatch.TorchDispatchMode` (it sees the operations below
autograd, as the device runs them) plus a hook on ``Tensor.tolist`` and ``Tensor.numpy``
(which read a CPU tensor's memory without an ATen operation). A copy to the CPU followed by
``.numpy()`` or ``.tolist()`` of its result counts once.
"""

from __future__ import annotations

import collections
import weakref

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["READ_OPS", "OpCounter"]

READ_OPS = (
    "aten._local_scalar_dense",
    "aten._unique",
    "aten._unique2",
    "aten.bincount",
    "aten.masked_select",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.unique_consecutive",
    "aten.unique_dim",
)
"""ATen operations (overload packets) that always read the device: a scalar read, or an output
whose size depends on the data."""


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)


def _device_of(x) -> torch.device | None:
    return x.device if isinstance(x, Tensor) else None


class OpCounter(TorchDispatchMode):
    """Context manager counting ATen operations and host reads (see the module docstring).

    Attributes (read after, or inside, the block):
        ops (int): ATen operations run.
        host_reads (int): operations and ``tolist``/``numpy`` calls that read the device.
        by_op (collections.Counter[str, int]): ATen operations by name (overload packet).
        read_ops (collections.Counter[str, int]): the host reads by name (``"tolist"``,
            ``"numpy"``, ``"to_cpu"`` for a copy from another device to the CPU, else the op).
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: collections.Counter[str] = collections.Counter()
        self.read_ops: collections.Counter[str] = collections.Counter()
        self._copied: weakref.WeakSet = weakref.WeakSet()
        self._saved: dict = {}

    @property
    def ops(self) -> int:
        """ATen operations counted so far."""
        return sum(self.by_op.values())

    @property
    def host_reads(self) -> int:
        """Host reads counted so far (the sum of :attr:`read_ops`)."""
        return sum(self.read_ops.values())

    def _read(self, name: str) -> None:
        self.read_ops[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.by_op[name] += 1
        out = func(*args, **kwargs)
        if name in READ_OPS:
            self._read(name)
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
            if "Tensor" in func._overloadname:  # repeats given as a tensor: size from data
                self._read(name)
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and _bool_index(args):
            self._read(name + "[bool]")
        elif name in ("aten._to_copy", "aten.copy_", "aten._copy_from"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst = out if isinstance(out, Tensor) else None
            if _device_of(src) is not None and dst is not None:
                if src.device.type != "cpu" and dst.device.type == "cpu":
                    self._read("to_cpu")
                    self._copied.add(dst)
        return out

    def __enter__(self):
        counter = self
        tolist, numpy = Tensor.tolist, Tensor.numpy
        self._saved = {"tolist": tolist, "numpy": numpy}

        def counted(method, name):
            def wrapper(t, *a, **k):
                if t.device.type == "cpu" and t not in counter._copied:
                    counter._read(name)
                return method(t, *a, **k)

            return wrapper

        Tensor.tolist = counted(tolist, "tolist")
        Tensor.numpy = counted(numpy, "numpy")
        return super().__enter__()

    def __exit__(self, *exc):
        Tensor.tolist = self._saved["tolist"]
        Tensor.numpy = self._saved["numpy"]
        return super().__exit__(*exc)
