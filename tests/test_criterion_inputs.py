"""MultiRouteCriterion at its boundaries: a matcher's indices and the weight dictionaries.

An index past an image's gts used to select the next image's gt (the gts of the batch are
concatenated), a negative one wrapped around, and a typo in ``route_weights`` was ignored. Each
must now raise a ``ValueError`` that names the culprit; valid indices must give the losses of the
independent loop oracle of ``test_criterion``.
"""

import pytest
import torch
from test_criterion import fixed, make_outputs, oracle_losses

from mrdetr.criterion import MultiRouteCriterion
from mrdetr.matching import HungarianMatcher, OneToManyMatcher, RouteMatcher

# make_outputs: B = 2 images with 2 and 3 gts, Q = 5 queries, K = 3 classes, 2 layers


def _crit(pairs):
    return MultiRouteCriterion(3, {"p": fixed(pairs)})


@pytest.mark.parametrize(
    "pairs, match",
    [
        ([([0, 1], [0, 2]), ([0], [0])], r"image 0: matcher returned gt_idx 2 outside \[0, N=2\)"),
        ([([0], [0]), ([0, 1], [1, -1])], r"image 1: matcher returned gt_idx -1 outside"),
        ([([5], [0]), ([0], [0])], r"image 0: matcher returned pred_idx 5 outside \[0, Q=5\)"),
        ([([0], [0]), ([-1], [0])], r"image 1: matcher returned pred_idx -1 outside"),
    ],
)
def test_out_of_range_indices_raise(pairs, match):
    out, targets = make_outputs(0)
    with pytest.raises(ValueError, match=match):
        _crit(pairs)({"p": out}, targets)


def test_gt_index_past_image_does_not_train_against_next_image():
    """gt 2 of image 0 (which has 2 gts) is gt 0 of image 1 in the concatenation: the bug. The
    same pairs written with the right image must give the oracle's losses."""
    out, targets = make_outputs(3, layers=1)
    good = [([1], [0]), ([0, 2], [0, 1])]
    losses = _crit(good)({"p": out}, targets)
    ref = oracle_losses(out["pred_logits"], out["pred_boxes"], targets, good, num_boxes=5)
    for term, value in ref.items():
        assert losses[f"{term}/p/layer0"].item() == pytest.approx(value, rel=1e-5)
    with pytest.raises(ValueError, match="gt_idx 2 outside"):
        _crit([([1, 2], [0, 2]), ([0], [1])])({"p": out}, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_indices_raise(dtype):
    out, targets = make_outputs(0)

    def matcher(outputs, targets):
        return [(torch.tensor([0, 1]).to(dtype), torch.tensor([0, 1])), (torch.tensor([0]),) * 2]

    with pytest.raises(ValueError, match=f"image 0: matcher returned pred_idx of dtype {dtype}"):
        MultiRouteCriterion(3, {"p": matcher})({"p": out}, targets)


def test_int32_indices_equal_int64():
    out, targets = make_outputs(4, layers=1)
    pairs = [([1, 3], [0, 1]), ([0, 2, 4], [2, 0, 1])]

    def int32(outputs, targets):
        return [(torch.tensor(p, dtype=torch.int32), torch.tensor(g).int()) for p, g in pairs]

    got = MultiRouteCriterion(3, {"p": int32})({"p": out}, targets)
    want = _crit(pairs)({"p": out}, targets)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize(
    "result, match",
    [
        ({0: 1, 1: 2}, "must return a list of 2"),
        ([(torch.tensor([0]),), (torch.tensor([0]),)], "image 0: .*pair of tensors"),
        ([(torch.tensor([0, 1]), torch.tensor([0])), ([], [])], "image 0: .*expected two int64"),
        ([(torch.tensor([0]), torch.tensor([0]))], "1 index pairs for 2 images"),
    ],
)
def test_malformed_matcher_results(result, match):
    out, targets = make_outputs(0)
    crit = MultiRouteCriterion(3, {"p": lambda o, t: result})
    with pytest.raises(ValueError, match=match):
        crit({"p": out}, targets)


def test_real_matchers_pass_the_check():
    """Our own matchers' indices (o2m: a prediction for several gts) go through unchanged."""
    out, targets = make_outputs(6)
    m = {"o2o": HungarianMatcher(), "o2m": OneToManyMatcher(k=2, iou_threshold=0.0)}
    losses = MultiRouteCriterion(3, {"p": m})({"p": out}, targets)
    assert torch.isfinite(losses["loss"])


def test_unknown_route_weight_raises_at_construction():
    router = RouteMatcher({"primary": HungarianMatcher(), "aux_ffn": OneToManyMatcher()})
    with pytest.raises(ValueError, match=r"route_weights: unknown routes \['aux_fn'\].*aux_ffn"):
        MultiRouteCriterion(3, router, route_weights={"aux_fn": 0.0})


def test_edited_weights_are_checked_at_forward():
    out, targets = make_outputs(0)
    crit = MultiRouteCriterion(3, {"p": HungarianMatcher()}, route_weights={"p": 0.5})
    crit.route_weights["q"] = 0.0
    with pytest.raises(ValueError, match=r"route_weights: unknown routes \['q'\]"):
        crit({"p": out}, targets)
    del crit.route_weights["q"]
    crit.weight_dict["loss_ce"] = 1.0
    with pytest.raises(ValueError, match=r"weight_dict: unknown terms \['loss_ce'\]"):
        crit({"p": out}, targets)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"route_weights": {"p": float("nan")}}, r"route_weights\['p'\] must be a finite number"),
        ({"weight_dict": {"loss_bbox": "5"}}, r"weight_dict\['loss_bbox'\] must be a finite"),
        ({"encoder_weight": float("inf")}, "encoder_weight must be a finite number"),
    ],
)
def test_non_numeric_weights_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiRouteCriterion(3, {"p": HungarianMatcher()}, **kwargs)


def test_route_weight_zero_for_absent_route_is_fine():
    """A weight for a route the matcher knows but the outputs lack (primary-only eval) is valid."""
    out, targets = make_outputs(0)
    router = RouteMatcher({"p": HungarianMatcher(), "aux": OneToManyMatcher()})
    crit = MultiRouteCriterion(3, router, route_weights={"aux": 0.0})
    assert torch.isfinite(crit({"p": out}, targets)["loss"])
