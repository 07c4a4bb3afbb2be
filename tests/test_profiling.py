"""OpCounter: ATen operations and host reads, against hand-counted snippets."""

import pytest
import torch

from mrdetr.profiling import OpCounter


def test_counts_ops_and_each_kind_of_read():
    x = torch.arange(6.0)
    with OpCounter() as count:
        y = x + 1  # 1 op
        y.sum().item()  # sum + _local_scalar_dense
        bool(y[0] > 0)  # select, gt, _local_scalar_dense
        y.tolist()  # no op, a read
        y.numpy()  # detach, a read
        y.nonzero()  # a read
        y[y > 2]  # gt, index with a bool mask: a read
        torch.repeat_interleave(torch.tensor([1, 2]))  # lift_fresh, repeat_interleave: a read
    assert count.by_op["aten.add"] == 1 and count.by_op["aten.sum"] == 1
    assert count.read_ops == {
        "aten._local_scalar_dense": 2,
        "tolist": 1,
        "numpy": 1,
        "aten.nonzero": 1,
        "aten.index[bool]": 1,
        "aten.repeat_interleave": 1,
    }
    assert count.host_reads == 7
    assert count.ops == sum(count.by_op.values()) >= 11


def test_read_free_code_counts_none_and_hooks_are_restored():
    tolist, numpy = torch.Tensor.tolist, torch.Tensor.numpy
    x = torch.rand(4, 5)
    with OpCounter() as count:
        v, i = x.topk(2, dim=1)
        torch.zeros(4, 5).scatter_add_(1, i, v)
        x[torch.tensor([0, 2])]  # integer indexing: no read
    assert count.host_reads == 0 and count.ops > 0
    assert torch.Tensor.tolist is tolist and torch.Tensor.numpy is numpy
    x.tolist()  # not counted after exit
    assert count.host_reads == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copy_to_cpu_then_numpy_counts_once():
    x = torch.rand(3, device="cuda")
    with OpCounter() as count:
        x.cpu().numpy()
    assert count.read_ops == {"to_cpu": 1}
