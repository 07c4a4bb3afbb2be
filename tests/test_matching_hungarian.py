"""HungarianMatcher and RepeatedGTMatcher against brute force, plain per-image costs and scipy."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from test_matching_oracles import (
    brute_force_min,
    cost_table,
    plain_cost,
    random_batch,
)

from mrdetr.matching import HungarianMatcher, RepeatedGTMatcher


def total(table, pred, gt):
    return sum(table[p][g] for p, g in zip(pred.tolist(), gt.tolist(), strict=True))


def check_valid(pairs, q, n, device="cpu"):
    p, g = pairs
    assert p.dtype == torch.int64 and g.dtype == torch.int64
    assert p.device.type == torch.device(device).type and g.device == p.device
    assert len(p) == len(g) == min(q, n)
    assert len(set(p.tolist())) == len(p) and len(set(g.tolist())) == len(g)
    assert all(0 <= x < q for x in p.tolist()) and all(0 <= x < n for x in g.tolist())


def test_hand_case_known_assignment():
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.2, 0.1, 0.3]])
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 0, 1] = logits[0, 1, 3] = logits[0, 2, 2] = 5.0
    outputs = {"pred_logits": logits, "pred_boxes": boxes[None]}
    # gt 0 = box of pred 2 (class 2), gt 1 = box of pred 0 (class 1)
    targets = [{"labels": torch.tensor([2, 1]), "boxes": boxes[[2, 0]]}]
    for cc in ("focal", "softmax"):
        ((p, g),) = HungarianMatcher(class_cost=cc)(outputs, targets)
        assert p.tolist() == [0, 2] and g.tolist() == [1, 0]  # sorted by prediction


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
def test_brute_force_tiny(seed, class_cost):
    q, n = 6, 1 + seed % 4
    outputs, targets = random_batch(1, q, [n], 5, seed)
    ((p, g),) = HungarianMatcher(class_cost=class_cost)(outputs, targets)
    check_valid((p, g), q, n)
    table = cost_table(
        outputs["pred_logits"][0],
        outputs["pred_boxes"][0],
        targets[0]["labels"],
        targets[0]["boxes"],
        class_cost,
    )
    assert total(table, p, g) == pytest.approx(brute_force_min(table), abs=1e-5)


def test_more_gts_than_queries_brute_force():
    outputs, targets = random_batch(1, 3, [5], 4, seed=11)
    ((p, g),) = HungarianMatcher()(outputs, targets)
    check_valid((p, g), 3, 5)
    table = cost_table(
        outputs["pred_logits"][0],
        outputs["pred_boxes"][0],
        targets[0]["labels"],
        targets[0]["boxes"],
    )
    transposed = [list(r) for r in zip(*table, strict=True)]  # [N][Q], N > Q: match all preds
    assert total(table, p, g) == pytest.approx(brute_force_min(transposed), abs=1e-5)


def test_batched_equals_single_images_and_plain_scipy():
    sizes = [3, 0, 7, 1, 12]
    outputs, targets = random_batch(len(sizes), 40, sizes, 9, seed=5)
    m = HungarianMatcher()
    batched = m(outputs, targets)
    for i, t in enumerate(targets):
        one = {k: v[i : i + 1] for k, v in outputs.items()}
        ((p1, g1),) = m(one, [t])
        assert torch.equal(batched[i][0], p1) and torch.equal(batched[i][1], g1)
        check_valid(batched[i], 40, sizes[i])
        if sizes[i]:
            c = plain_cost(
                outputs["pred_logits"][i], outputs["pred_boxes"][i], t["labels"], t["boxes"]
            )
            rows, cols = linear_sum_assignment(c.numpy())
            assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == sorted(
                zip(batched[i][0].tolist(), batched[i][1].tolist(), strict=True)
            )


def test_cost_matrix_matches_plain_cost():
    sizes = [4, 2]
    outputs, targets = random_batch(2, 10, sizes, 6, seed=8)
    for cc in ("focal", "softmax"):
        m = HungarianMatcher(class_cost=cc)
        labels = torch.stack(
            [torch.cat([t["labels"], t["labels"].new_zeros(4 - len(t["labels"]))]) for t in targets]
        )
        boxes = torch.stack(
            [
                torch.cat([t["boxes"], t["boxes"].new_full((4 - len(t["boxes"]), 4), 0.5)])
                for t in targets
            ]
        )
        c = m.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], labels, boxes)
        assert c.shape == (2, 4, 10)
        for i, t in enumerate(targets):
            want = plain_cost(
                outputs["pred_logits"][i], outputs["pred_boxes"][i], t["labels"], t["boxes"], cc
            )
            assert torch.allclose(c[i, : sizes[i]].T.double(), want, atol=1e-5)


def test_empty_targets():
    outputs, targets = random_batch(3, 5, [0, 0, 0], 4, seed=1)
    for m in (HungarianMatcher(), RepeatedGTMatcher()):
        for p, g in m(outputs, targets):
            assert p.shape == g.shape == (0,) and p.dtype == g.dtype == torch.int64


def test_repeated_gt_matches_hungarian_on_repeated_targets():
    outputs, targets = random_batch(2, 30, [3, 4], 5, seed=2)
    rep = RepeatedGTMatcher(k=3)(outputs, targets)
    repeated = [
        {"labels": t["labels"].repeat(3), "boxes": t["boxes"].repeat(3, 1)} for t in targets
    ]
    ref = HungarianMatcher()(outputs, repeated)
    for (p, g), (rp, rg), t in zip(rep, ref, targets, strict=True):
        n = len(t["labels"])
        assert torch.equal(p, rp) and torch.equal(g, rg % n)
        assert len(p) == 3 * n and len(set(p.tolist())) == len(p)
        assert torch.bincount(g, minlength=n).tolist() == [3] * n
    # fewer queries than k * N: every query used once
    ((p, g),) = RepeatedGTMatcher(k=6)({k: v[:1, :10] for k, v in outputs.items()}, targets[:1])
    assert sorted(p.tolist()) == list(range(10))


@pytest.mark.parametrize("matcher", [HungarianMatcher(), RepeatedGTMatcher()])
def test_bad_inputs(matcher):
    outputs, targets = random_batch(2, 8, [2, 3], 5, seed=0)
    bad = [targets[0], {"labels": torch.tensor([0, 5, 1]), "boxes": targets[1]["boxes"]}]
    with pytest.raises(ValueError, match=r"image 1.*'labels'.*\[0, 5\).*5"):
        matcher(outputs, bad)
    nan_boxes = targets[1]["boxes"].clone()
    nan_boxes[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image 1.*'boxes'.*finite"):
        matcher(outputs, [targets[0], {"labels": targets[1]["labels"], "boxes": nan_boxes}])
    with pytest.raises(ValueError, match=r"image 0.*'boxes'.*\[2, 4\]"):
        matcher(outputs, [{"labels": targets[0]["labels"], "boxes": torch.zeros(2, 3)}, targets[1]])
    with pytest.raises(ValueError, match=r"image 0.*'labels'.*int64"):
        matcher(outputs, [{"labels": torch.zeros(2), "boxes": targets[0]["boxes"]}, targets[1]])
    with pytest.raises(ValueError, match=r"expected 2 targets.*received 1"):
        matcher(outputs, targets[:1])
    meta = {"labels": targets[1]["labels"].to("meta"), "boxes": targets[1]["boxes"].to("meta")}
    with pytest.raises(ValueError, match=r"image 1.*'labels' is on meta.*predictions on cpu"):
        matcher(outputs, [targets[0], meta])
    with pytest.raises(ValueError, match=r"pred_boxes.*\[B, Q, 4\]"):
        matcher(
            {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"][..., :3]},
            targets,
        )
    nan_pred = outputs["pred_boxes"].clone()
    nan_pred[1, 4, 1] = float("inf")
    with pytest.raises(ValueError, match=r"image 1.*pred_boxes.*finite.*query 4"):
        matcher({"pred_logits": outputs["pred_logits"], "pred_boxes": nan_pred}, targets)


def test_no_grad_and_detached_inputs():
    outputs, targets = random_batch(1, 6, [2], 3, seed=4)
    outputs = {k: v.requires_grad_(True) for k, v in outputs.items()}
    ((p, g),) = HungarianMatcher()(outputs, targets)
    assert not p.requires_grad and outputs["pred_boxes"].grad is None


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.integers(1, 900),
    sizes=st.lists(st.integers(0, 100), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    class_cost=st.sampled_from(["focal", "softmax"]),
)
def test_fuzz_optimal_against_plain_scipy(q, sizes, seed, class_cost):
    outputs, targets = random_batch(len(sizes), q, sizes, 11, seed)
    result = HungarianMatcher(class_cost=class_cost)(outputs, targets)
    for i, t in enumerate(targets):
        check_valid(result[i], q, sizes[i])
        if sizes[i] == 0:
            continue
        c = plain_cost(
            outputs["pred_logits"][i], outputs["pred_boxes"][i], t["labels"], t["boxes"], class_cost
        )
        rows, cols = linear_sum_assignment(c.numpy())
        p, g = result[i]
        assert c[p, g].sum().item() == pytest.approx(c[rows, cols].sum().item(), abs=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    outputs, targets = random_batch(3, 300, [5, 0, 20], 10, seed=9)
    cpu = HungarianMatcher()(outputs, targets)
    cuda_out = {k: v.cuda() for k, v in outputs.items()}
    cuda_t = [{k: v.cuda() for k, v in t.items()} for t in targets]
    got = HungarianMatcher()(cuda_out, cuda_t)
    for (p, g), (cp, cg), n in zip(got, cpu, [5, 0, 20], strict=True):
        check_valid((p, g), 300, n, device="cuda")
        assert torch.equal(p.cpu(), cp) and torch.equal(g.cpu(), cg)
