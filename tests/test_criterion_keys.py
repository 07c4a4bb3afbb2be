"""MultiRouteCriterion(key_style="detr"): DETR / Deformable-DETR engines' weighted sum of the loss
dict equals the criterion's own weighted total, with DETR's key names."""

import copy

import pytest
import torch
from test_criterion import fixed, make_outputs

from mrdetr.criterion import MultiRouteCriterion
from mrdetr.criterion_keys import detr_key
from mrdetr.matching import RouteMatcher


def detr_engine_total(loss_dict, weight_dict):
    """The line of DETR's / Deformable-DETR's engine.train_one_epoch."""
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict.keys() if k in weight_dict)


def setup():
    primary, targets = make_outputs(0, layers=3, enc=True)
    aux, _ = make_outputs(1, layers=3)
    both, _ = make_outputs(2, layers=3)
    pairs = [([1, 3], [0, 1]), ([0, 2, 4], [2, 0, 1])]
    o2m = [([0, 0, 1], [0, 1, 1]), ([4], [2])]
    matcher = {
        "primary": fixed(pairs),
        "aux_ffn": fixed(o2m),
        "aux_both": {"o2o": fixed(pairs), "o2m": fixed(o2m)},
    }
    outputs = {"primary": primary, "aux_ffn": aux, "aux_both": both}
    kwargs = dict(route_weights={"aux_ffn": 0.5}, weight_dict={"loss_bbox": 4.0})
    return outputs, targets, matcher, kwargs


def test_detr_engine_sum_equals_the_weighted_total():
    outputs, targets, matcher, kwargs = setup()
    ours = MultiRouteCriterion(3, RouteMatcher(matcher), **kwargs)(outputs, targets)
    crit = MultiRouteCriterion(3, RouteMatcher(matcher), key_style="detr", **kwargs)
    loss_dict = crit(outputs, targets)
    assert set(loss_dict) == set(crit.weight_dict)  # no term silently left out of the sum
    torch.testing.assert_close(detr_engine_total(loss_dict, crit.weight_dict), ours["loss"])
    assert "loss" not in loss_dict
    # every DETR-style value is one of our named values, e.g.:
    same = {
        "loss_ce": "loss_class/primary/layer2",
        "loss_bbox_0": "loss_bbox/primary/layer0",
        "loss_giou_enc": "loss_giou/primary/enc",
        "loss_ce_1_aux_ffn": "loss_class/aux_ffn/layer1",
        "loss_bbox_aux_both_o2m": "loss_bbox/aux_both:o2m/layer2",
    }
    for detr, mine in same.items():
        assert torch.equal(loss_dict[detr], ours[mine]), detr
    assert crit.weight_dict["loss_bbox"] == 4.0
    assert crit.weight_dict["loss_ce_1_aux_ffn"] == 2.0 * 0.5
    assert crit.weight_dict["loss_giou_enc"] == 2.0 * 3.0
    assert len(loss_dict) == len(ours) - 1


def test_default_style_keeps_keys_and_weight_dict():
    outputs, targets, matcher, kwargs = setup()
    crit = MultiRouteCriterion(3, RouteMatcher(matcher), **kwargs)
    assert crit.weight_dict is crit.term_weights
    assert "loss_class/primary/layer0" in crit(outputs, targets)
    copy.deepcopy(MultiRouteCriterion(3, RouteMatcher(matcher), key_style="detr"))


def test_detr_key_by_hand_and_errors():
    kw = dict(primary="primary", last_layer=5)
    assert detr_key("loss_class", "primary", None, "layer5", **kw) == "loss_ce"
    assert detr_key("loss_giou", "primary", None, "layer0", **kw) == "loss_giou_0"
    assert detr_key("loss_bbox", "aux", "o2m", "enc", **kw) == "loss_bbox_enc_aux_o2m"
    assert detr_key("loss_moe", "aux", None, "", **kw) == "loss_moe_aux"
    with pytest.raises(ValueError, match="key_style"):
        MultiRouteCriterion(3, {"primary": fixed([])}, key_style="detectron")
    outputs, targets, _, _ = setup()
    pairs = [([1, 3], [0, 1]), ([0, 2, 4], [2, 0, 1])]
    clash = {"primary": fixed(pairs), "enc": fixed(pairs)}  # "loss_ce_enc" twice
    crit = MultiRouteCriterion(3, RouteMatcher(clash), key_style="detr")
    with pytest.raises(ValueError, match="loss_ce_enc"):
        crit({"primary": outputs["primary"], "enc": outputs["aux_ffn"]}, targets)
