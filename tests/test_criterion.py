"""MultiRouteCriterion against a loop oracle with fixed matches, names, weights, edge cases."""

import math

import pytest
import torch
from test_matching_oracles import random_batch, scalar_giou

from mrdetr.criterion import MultiRouteCriterion
from mrdetr.matching import HungarianMatcher, OneToManyMatcher, RouteMatcher


def fixed(pairs_per_image):
    """A matcher returning given pairs."""

    def matcher(outputs, targets):
        return [
            (torch.tensor(p, dtype=torch.int64), torch.tensor(g, dtype=torch.int64))
            for p, g in pairs_per_image
        ]

    return matcher


def oracle_losses(logits, boxes, targets, pairs, num_boxes, alpha=0.25, gamma=2.0):
    """Focal / L1 / GIoU sums over a batch with explicit loops, divided by num_boxes."""
    b, q, k = logits.shape
    cls = l1 = gi = 0.0
    for i in range(b):
        pos = {(p, targets[i]["labels"][g].item()) for p, g in zip(*pairs[i], strict=True)}
        for qq in range(q):
            for c in range(k):
                x = logits[i, qq, c].item()
                t = 1.0 if (qq, c) in pos else 0.0
                p = 1 / (1 + math.exp(-x))
                ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
                p_t = p * t + (1 - p) * (1 - t)
                cls += (alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma * ce
        for p, g in zip(*pairs[i], strict=True):
            pb, gb = boxes[i, p].tolist(), targets[i]["boxes"][g].tolist()
            l1 += sum(abs(u - v) for u, v in zip(pb, gb, strict=True))
            gi += 1 - scalar_giou(pb, gb)[1]
    return {"loss_class": cls / num_boxes, "loss_bbox": l1 / num_boxes, "loss_giou": gi / num_boxes}


def make_outputs(seed, b=2, q=5, k=3, layers=2, sizes=(2, 3), enc=False):
    outputs, targets = random_batch(b, q, list(sizes), k, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    aux = [
        {
            "pred_logits": torch.randn(b, q, k, generator=gen),
            "pred_boxes": torch.rand(b, q, 4, generator=gen) * 0.3 + 0.2,
        }
        for _ in range(layers - 1)
    ]
    out = {**outputs, "aux_outputs": aux}
    if enc:
        out["enc_outputs"] = {
            "pred_logits": torch.randn(b, 7, k, generator=gen),
            "pred_boxes": torch.rand(b, 7, 4, generator=gen) * 0.3 + 0.2,
        }
    return out, targets


def test_values_names_and_weighted_sum_against_oracle():
    primary, targets = make_outputs(0)
    aux_route, _ = make_outputs(1)
    pairs_a = [([1, 3], [0, 1]), ([0, 2, 4], [2, 0, 1])]
    pairs_b = [([0, 0, 1], [0, 1, 1]), ([4], [2])]  # o2m-like: pred 0 matched to two gts
    router = RouteMatcher(
        {"primary": fixed(pairs_a), "aux": {"o2o": fixed(pairs_a), "o2m": fixed(pairs_b)}}
    )
    crit = MultiRouteCriterion(
        3, router, route_weights={"aux": 0.5}, weight_dict={"loss_bbox": 4.0}
    )
    losses = crit({"primary": primary, "aux": aux_route}, targets)
    expected_names = {"loss"}
    want_total = 0.0
    weights = {"loss_class": 2.0, "loss_bbox": 4.0, "loss_giou": 2.0}
    for route, out, tags in (
        ("primary", primary, [("primary", pairs_a)]),
        ("aux", aux_route, [("aux:o2o", pairs_a), ("aux:o2m", pairs_b)]),
    ):
        sets = [*out["aux_outputs"], out]
        for layer, s in enumerate(sets):
            for tag, pairs in tags:
                ref = oracle_losses(s["pred_logits"], s["pred_boxes"], targets, pairs, num_boxes=5)
                for term, value in ref.items():
                    name = f"{term}/{tag}/layer{layer}"
                    expected_names.add(name)
                    assert losses[name].item() == pytest.approx(value, rel=1e-5), name
                    want_total += weights[term] * (0.5 if route == "aux" else 1.0) * value
    assert set(losses) == expected_names
    assert losses["loss"].item() == pytest.approx(want_total, rel=1e-5)


def test_encoder_losses_weighted_three_times():
    out, targets = make_outputs(2, layers=1, enc=True)
    enc_pairs = [([6, 0], [0, 1]), ([1, 2, 3], [0, 1, 2])]
    dec_pairs = [([1, 3], [0, 1]), ([0, 2, 4], [2, 0, 1])]

    calls = []

    def matcher(outputs, targets):  # encoder outputs have 7 proposals
        calls.append(outputs["pred_logits"].shape[1])
        return fixed(enc_pairs if outputs["pred_logits"].shape[1] == 7 else dec_pairs)(
            outputs, targets
        )

    losses = MultiRouteCriterion(3, {"r": matcher})({"r": out}, targets)
    assert calls == [5, 7]
    enc = oracle_losses(
        out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"], targets, enc_pairs, 5
    )
    dec = oracle_losses(out["pred_logits"], out["pred_boxes"], targets, dec_pairs, 5)
    w = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    for term in w:
        assert losses[f"{term}/r/enc"].item() == pytest.approx(enc[term], rel=1e-5)
    want = sum(w[t] * (dec[t] + 3 * enc[t]) for t in w)
    assert losses["loss"].item() == pytest.approx(want, rel=1e-5)


def test_empty_targets_only_no_object_loss_and_gradients():
    out, _ = make_outputs(3, sizes=(0, 0))
    out = {k: (v.requires_grad_(True) if torch.is_tensor(v) else v) for k, v in out.items()}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    crit = MultiRouteCriterion(3, RouteMatcher({"p": HungarianMatcher(), "a": OneToManyMatcher()}))
    losses = crit({"p": out, "a": out}, targets)
    ref = oracle_losses(
        out["pred_logits"].detach(),
        out["pred_boxes"].detach(),
        targets,
        [([], []), ([], [])],
        num_boxes=1,
    )
    assert losses["loss_class/p/layer1"].item() == pytest.approx(ref["loss_class"], rel=1e-5)
    assert losses["loss_bbox/a/layer1"].item() == 0.0 and losses["loss_giou/p/layer0"].item() == 0.0
    losses["loss"].backward()
    assert torch.isfinite(out["pred_logits"].grad).all()
    assert out["pred_logits"].grad.abs().sum() > 0


def test_real_matchers_end_to_end_gradients():
    out, targets = make_outputs(4, q=30, sizes=(4, 6))
    for v in (out["pred_logits"], out["pred_boxes"]):
        v.requires_grad_(True)
    crit = MultiRouteCriterion(3, RouteMatcher({"p": HungarianMatcher(), "a": OneToManyMatcher()}))
    losses = crit({"p": out, "a": out}, targets)
    losses["loss"].backward()
    assert out["pred_boxes"].grad.abs().sum() > 0


def test_bad_inputs():
    out, targets = make_outputs(5)
    crit = MultiRouteCriterion(3, {"p": HungarianMatcher()})
    with pytest.raises(ValueError, match="no matcher for route 'x'"):
        crit({"x": out}, targets)
    with pytest.raises(ValueError, match=r"route 'p', layer1.*4 classes.*num_classes = 3"):
        crit({"p": {**out, "pred_logits": torch.zeros(2, 5, 4)}}, targets)
    with pytest.raises(ValueError, match="aux_outputs"):
        crit({"p": {**out, "aux_outputs": {"a": 1}}}, targets)
    with pytest.raises(ValueError, match=r"image 1.*'labels'"):
        crit(
            {"p": out},
            [targets[0], {"labels": torch.tensor([9, 0, 0]), "boxes": targets[1]["boxes"]}],
        )
    with pytest.raises(ValueError, match="unknown terms"):
        MultiRouteCriterion(3, {"p": HungarianMatcher()}, weight_dict={"loss_ce": 1.0})
