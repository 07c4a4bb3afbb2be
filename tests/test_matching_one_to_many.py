"""OneToManyMatcher: the five rules one by one on hand cases, then against a loop oracle."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_matching_oracles import o2m_oracle, random_batch

from mrdetr.matching import OneToManyMatcher


def xyxy_to_cxcywh(boxes):
    b = torch.tensor(boxes, dtype=torch.float32)
    return torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], -1)


def run(matcher, preds, gts, labels=None, logits=None):
    """One image; boxes given as xyxy lists; class term off unless logits are given."""
    q = len(preds)
    labels = torch.zeros(len(gts), dtype=torch.int64) if labels is None else labels
    logits = torch.full((q, 2), -30.0) if logits is None else logits
    outputs = {"pred_logits": logits[None], "pred_boxes": xyxy_to_cxcywh(preds)[None]}
    targets = [{"labels": labels, "boxes": xyxy_to_cxcywh(gts) if gts else torch.zeros(0, 4)}]
    ((p, g),) = matcher(outputs, targets)
    return sorted(zip(p.tolist(), g.tolist(), strict=True))


IOU_ONLY = dict(iou_weight=1.0, class_weight=0.0)
GT = [[0.0, 0.0, 1.0, 1.0]]


def test_rule1_quality_combines_iou_and_class():
    # pred 0: IoU 0.5 with the gt, class prob 0; pred 1: IoU 0.25, class prob sigmoid(30) ~ 1
    preds = [[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.5, 0.5]]
    logits = torch.tensor([[-30.0, -30.0], [30.0, -30.0]])
    m = OneToManyMatcher(k=1, iou_threshold=0.0, low_quality_matches=False)
    # quality: 0.7 * 0.5 = 0.35 vs 0.7 * 0.25 + 0.3 = 0.475 -> pred 1 wins the single slot
    assert run(m, preds, GT, logits=logits) == [(1, 0)]
    m = OneToManyMatcher(
        k=1, iou_threshold=0.0, iou_weight=1.0, class_weight=0.0, low_quality_matches=False
    )
    assert run(m, preds, GT, logits=logits) == [(0, 0)]


def test_rule2_threshold_is_inclusive():
    preds = [[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 0.4], [0.0, 0.0, 1.0, 0.6]]  # IoU .5 .4 .6
    m = OneToManyMatcher(iou_threshold=0.5, low_quality_matches=False, **IOU_ONLY)
    assert run(m, preds, GT) == [(0, 0), (2, 0)]
    m = OneToManyMatcher(iou_threshold=0.61, low_quality_matches=False, **IOU_ONLY)
    assert run(m, preds, GT) == []


def test_rule3_low_quality_match_added():
    preds = [[0.0, 0.0, 1.0, 0.2], [0.0, 0.0, 1.0, 0.3], [5.0, 5.0, 6.0, 6.0]]  # IoU .2 .3 0
    assert run(OneToManyMatcher(**IOU_ONLY), preds, GT) == [(1, 0)]
    assert run(OneToManyMatcher(low_quality_matches=False, **IOU_ONLY), preds, GT) == []


def test_rule3_low_quality_prediction_keeps_its_own_best_gt():
    # gt A = [0,0,1,1], gt B = [0.9,0,1.9,1]; pred 0 overlaps A a lot (IoU 0.35 < thr) and B a
    # little; pred 1 overlaps B with IoU 0.05. B's best prediction is pred 0? No: make pred 0
    # the best for B: B's only overlaps are pred 0 (0.1) and pred 1 (0.05).
    gts = [[0.0, 0.0, 1.0, 1.0], [0.9, 0.0, 1.9, 1.0]]
    preds = [[0.0, 0.0, 1.0, 0.35], [1.85, 0.0, 1.9, 1.0]]
    # pred 0: IoU(A) = .35, IoU(B) = .035/(.35+1-.035) = .0266; pred 1: IoU(B) = .05, IoU(A) = 0
    # A's best pred = 0 (positive, best gt A); B's best = pred 1 (positive, best gt B).
    assert run(OneToManyMatcher(**IOU_ONLY), preds, gts) == [(0, 0), (1, 1)]
    # now pred 1 disappears far away: B's best prediction is pred 0, whose best gt is A -> pred 0
    # becomes positive for A only; count_B = 0 so B gets no pair at all.
    preds = [[0.0, 0.0, 1.0, 0.35], [5.0, 5.0, 6.0, 6.0]]
    assert run(OneToManyMatcher(**IOU_ONLY), preds, gts) == [(0, 0)]


def test_rule45_count_selects_top_predictions_over_all_predictions():
    # gts A = [0,0,1,1], B = [0,0,1,0.9] (nested). pred X = [0,0,1,0.85]: IoU(A) .85, IoU(B) .944
    # -> best gt B. pred Y = [0,0,1,0.5]: IoU(A) .5, IoU(B) .556 -> best gt B too.
    # pred Z = [0, 0.5, 1, 1.4]: IoU(A) = .5/1.4 = .357, IoU(B) = .4/1.5 = .267 -> best A, < thr
    gts = [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.9]]
    preds = [[0.0, 0.0, 1.0, 0.85], [0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.4]]
    m = OneToManyMatcher(**IOU_ONLY)
    # positives: X, Y (best B) -> count_B = 2. A: no rule-2 positive; A's best prediction is X
    # (rule 3) but X counts for B. So count_A = 0: A gets nothing, B gets its top 2: X, Y.
    assert run(m, preds, gts) == [(0, 1), (1, 1)]
    # With Z's best gt A above the threshold (threshold .3): count_A = 1 -> A is paired with its
    # single best prediction over ALL predictions, X (.85), not with Z, the positive (.357).
    m = OneToManyMatcher(iou_threshold=0.3, **IOU_ONLY)
    assert run(m, preds, gts) == [(0, 0), (0, 1), (1, 1)]


def test_rule5_k_caps_pairs():
    preds = [[0.0, 0.0, 1.0, 0.5 + 0.05 * i] for i in range(9)]  # IoU .5 .. .9, all positive
    pairs = run(OneToManyMatcher(k=6, **IOU_ONLY), preds, GT)
    assert pairs == [(i, 0) for i in range(3, 9)]  # the six best
    assert len(run(OneToManyMatcher(k=20, **IOU_ONLY), preds, GT)) == 9


def test_ties_break_towards_lower_index():
    # four identical predictions; k = 2 -> the first two by index, always
    preds = [[0.0, 0.0, 1.0, 0.8]] * 4
    assert run(OneToManyMatcher(k=2, **IOU_ONLY), preds, GT) == [(0, 0), (1, 0)]
    # two identical gts: every prediction's best gt is gt 0 (first), so gt 1 gets nothing
    assert run(OneToManyMatcher(k=2, **IOU_ONLY), preds, GT * 2) == [(0, 0), (1, 0)]


def test_output_order_by_gt_then_quality():
    outputs, targets = random_batch(1, 50, [4], 3, seed=0)
    ((p, g),) = OneToManyMatcher()(outputs, targets)
    assert g.tolist() == sorted(g.tolist())
    assert p.dtype == g.dtype == torch.int64


@pytest.mark.parametrize("seed", range(4))
def test_against_oracle_and_single_vs_batched(seed):
    sizes = [5, 0, 12, 1]
    outputs, targets = random_batch(4, 120, sizes, 7, seed)
    m = OneToManyMatcher()
    batched = m(outputs, targets)
    for i, t in enumerate(targets):
        want = o2m_oracle(
            outputs["pred_logits"][i], outputs["pred_boxes"][i], t["labels"], t["boxes"]
        )
        p, g = batched[i]
        assert sorted(zip(p.tolist(), g.tolist(), strict=True)) == want
        ((p1, g1),) = m({k: v[i : i + 1] for k, v in outputs.items()}, [t])
        assert torch.equal(p, p1) and torch.equal(g, g1)


def test_quantized_inputs_with_many_ties_against_oracle():
    # coarse boxes and logits: many exact ties everywhere, exercising the fallback paths
    outputs, targets = random_batch(2, 60, [6, 9], 3, seed=3)
    outputs["pred_boxes"] = (outputs["pred_boxes"] * 8).round() / 8 + 1 / 16
    outputs["pred_logits"] = outputs["pred_logits"].round()
    for t in targets:
        t["boxes"] = (t["boxes"] * 8).round() / 8 + 1 / 16
    for low in (True, False):
        result = OneToManyMatcher(k=4, low_quality_matches=low)(outputs, targets)
        for i, t in enumerate(targets):
            want = o2m_oracle(
                outputs["pred_logits"][i],
                outputs["pred_boxes"][i],
                t["labels"],
                t["boxes"],
                k=4,
                low=low,
            )
            p, g = result[i]
            assert sorted(zip(p.tolist(), g.tolist(), strict=True)) == want


def test_empty_and_bad_inputs():
    outputs, targets = random_batch(2, 10, [0, 0], 3, seed=0)
    for p, g in OneToManyMatcher()(outputs, targets):
        assert p.shape == g.shape == (0,) and p.dtype == g.dtype == torch.int64
    outputs, targets = random_batch(2, 10, [2, 3], 3, seed=0)
    targets[1]["labels"] = torch.tensor([0, 1, -1])
    with pytest.raises(ValueError, match=r"image 1.*'labels'.*-1"):
        OneToManyMatcher()(outputs, targets)
    targets[1]["labels"] = torch.tensor([0, 1, 2])
    logits = outputs["pred_logits"].clone()
    logits[0, 3, targets[0]["labels"][0]] = float("nan")
    with pytest.raises(ValueError, match=r"image 0.*pred_logits.*finite"):
        OneToManyMatcher()({"pred_logits": logits, "pred_boxes": outputs["pred_boxes"]}, targets)
    with pytest.raises(ValueError, match="k must be"):
        OneToManyMatcher(k=0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.integers(1, 900),
    sizes=st.lists(st.integers(0, 100), min_size=1, max_size=2),
    seed=st.integers(0, 2**16),
    k=st.integers(1, 8),
)
def test_fuzz_against_oracle(q, sizes, seed, k):
    outputs, targets = random_batch(len(sizes), q, sizes, 5, seed)
    result = OneToManyMatcher(k=k)(outputs, targets)
    for i, t in enumerate(targets):
        want = o2m_oracle(
            outputs["pred_logits"][i], outputs["pred_boxes"][i], t["labels"], t["boxes"], k=k
        )
        p, g = result[i]
        assert sorted(zip(p.tolist(), g.tolist(), strict=True)) == want


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    outputs, targets = random_batch(3, 300, [5, 0, 20], 10, seed=9)
    cpu = OneToManyMatcher()(outputs, targets)
    got = OneToManyMatcher()(
        {k: v.cuda() for k, v in outputs.items()},
        [{k: v.cuda() for k, v in t.items()} for t in targets],
    )
    for (p, g), (cp, cg) in zip(got, cpu, strict=True):
        assert p.device.type == "cuda" and p.dtype == torch.int64
        assert torch.equal(p.cpu(), cp) and torch.equal(g.cpu(), cg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_ranked_equals_a_stable_sort_with_many_ties(dtype):
    from mrdetr.matching.one_to_many import ranked

    gen = torch.Generator().manual_seed(5)
    quality = (torch.randint(-4, 5, (3, 4, 40), generator=gen) / 4).to(dtype)  # many ties
    quality[0, 1, 7] = float("-inf")
    quality[1, 2] = float("-inf")  # a padding row
    quality[2, 0, 3] = -0.0
    order = quality.sort(dim=2, descending=True, stable=True).indices[:, :, :6]
    assert torch.equal(ranked(quality, 6), order)
