"""The matchers' scratch memory is bounded, chunking does not change results, inference mode and
threads are handled.

Memory is measured with the workspace's own accounting (the bytes it keeps between calls).
"""

import pytest
import torch
from _threads import intra_op_threads, record_threads
from test_matching_oracles import plain_cost, random_batch
from test_matching_oracles import random_image as _random_image

import mrdetr.matching.hungarian as hungarian_module
from mrdetr.matching import HungarianMatcher, OneToManyMatcher, RepeatedGTMatcher
from mrdetr.matching.workspace import MAX_BYTES, Workspace


def _kept(matcher):
    """Bytes the matcher's workspace keeps (read from its store, as before the accounting)."""
    store = matcher._workspace._local.__dict__.get("store", {})
    return sum(t.numel() * t.element_size() for t in store.values())


def _same(a, b):
    for (p, g), (p2, g2) in zip(a, b, strict=True):
        assert torch.equal(p, p2) and torch.equal(g, g2)


def test_repeated_gt_keeps_bounded_scratch_at_large_size():
    """B=2, Q=1000, 200 gts, k=6 kept 5 x [2, 1200, 1000] floats = 48 MB before; now the cost
    is computed on the 200 original gts and at most MAX_BYTES is kept."""
    gen = torch.Generator().manual_seed(0)
    items = [_random_image(1000, 200, 5, gen) for _ in range(2)]
    outputs = {
        "pred_logits": torch.stack([x[0] for x in items]),
        "pred_boxes": torch.stack([x[1] for x in items]),
    }
    m = RepeatedGTMatcher(k=6)
    m(outputs, [x[2] for x in items])
    assert 0 < _kept(m) <= MAX_BYTES
    assert m._workspace.nbytes() == _kept(m)


@pytest.mark.parametrize(
    "make",
    [
        lambda b: HungarianMatcher(workspace_bytes=b),
        lambda b: HungarianMatcher(class_cost="softmax", workspace_bytes=b),
        lambda b: OneToManyMatcher(k=3, workspace_bytes=b),
        lambda b: RepeatedGTMatcher(k=4, workspace_bytes=b),
    ],
)
def test_chunked_blocks_equal_one_block(make):
    """A 16 KiB budget splits the gt axis into many chunks; the matches must not change and the
    kept memory must stay within the budget."""
    outputs, targets = random_batch(3, 60, [17, 0, 23], 5, seed=4)
    small, large = make(2**14), make(2**30)
    _same(small(outputs, targets), large(outputs, targets))
    assert _kept(small) <= 2**14
    assert _kept(large) > 2**14  # the one-block path was really taken


def test_chunked_cost_matrix_equals_plain_cost():
    outputs, targets = random_batch(2, 50, [13, 7], 4, seed=5)
    m = HungarianMatcher(workspace_bytes=2**12)  # one gt row per chunk
    labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True)
    boxes = torch.nn.utils.rnn.pad_sequence([t["boxes"] for t in targets], batch_first=True)
    cost = m.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], labels, boxes)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        want = plain_cost(outputs["pred_logits"][i], outputs["pred_boxes"][i], *t.values())
        torch.testing.assert_close(cost[i, :n].T.double(), want, atol=1e-4, rtol=1e-5)


def test_workspace_bound_and_release():
    ws = Workspace(max_bytes=1000)
    small = ws.buffers(2, (10, 10), torch.float32, "cpu")  # 800 bytes: kept
    assert ws.nbytes() == 800 and small[0].data_ptr() != small[1].data_ptr()
    assert ws.buffers(2, (10, 10), torch.float32, "cpu")[0].data_ptr() == small[0].data_ptr()
    ws.buffers(2, (20, 20), torch.float32, "cpu")  # 3200 bytes: fresh, not kept
    assert ws.nbytes() == 800
    ws.clear()
    assert ws.nbytes() == 0
    assert ws.rows_per_chunk(5, 100, torch.float32) == 1  # at least one row
    assert ws.rows_per_chunk(1, 25, torch.float32) == 10
    with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
        Workspace(max_bytes=-1)


@pytest.mark.parametrize("first", ["inference", "normal"])
def test_inference_mode_then_normal_mode(first):
    """Buffers made under inference_mode cannot be written outside it (and vice versa)."""
    outputs, targets = random_batch(2, 30, [4, 6], 3, seed=6)
    for m in (HungarianMatcher(), OneToManyMatcher(k=2)):
        want = m(outputs, targets)
        m._workspace.clear()
        for mode in [True, False] if first == "inference" else [False, True]:
            with torch.inference_mode(mode):
                _same(m(outputs, targets), want)


def test_matching_runs_single_threaded_and_restores(monkeypatch):
    """The rule against libgomp spin-wait stalls: cost blocks run with one intra-op thread, and
    the caller's thread count is restored, also when matching raises."""
    seen = record_threads(monkeypatch, hungarian_module, "add_box_l1_cost")
    with intra_op_threads(2):
        outputs, targets = random_batch(2, 30, [4, 6], 3, seed=7)
        m = HungarianMatcher()
        m(outputs, targets)
        assert seen == [1] and torch.get_num_threads() == 2
        bad = {**outputs, "pred_boxes": outputs["pred_boxes"].clone()}
        bad["pred_boxes"][1, 3, 0] = float("nan")
        with pytest.raises(ValueError, match="image 1"):
            m(bad, targets)
        assert torch.get_num_threads() == 2
