"""Matchers and the criterion copy, pickle and save: EMA copies and whole-model checkpoints.

Each copy is taken after the original has run (its scratch workspace holds buffers, the state
that used to fail with ``cannot pickle '_thread._local'``) and must give the same matches (or
losses) as the original; copies keep the workspace bound and nothing else of the scratch.
"""

import copy
import io
import pickle

import pytest
import torch
from test_matching_oracles import random_batch

from mrdetr.criterion import MultiRouteCriterion
from mrdetr.matching import (
    HungarianMatcher,
    OneToManyMatcher,
    RepeatedGTMatcher,
    RouteMatcher,
)


def _pickle(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickle, "torch.save": _torch_save}

MATCHERS = {
    "hungarian_focal": lambda: HungarianMatcher(),
    "hungarian_softmax": lambda: HungarianMatcher(class_cost="softmax", workspace_bytes=2**16),
    "one_to_many": lambda: OneToManyMatcher(k=3, iou_threshold=0.3),
    "repeated_gt": lambda: RepeatedGTMatcher(k=3),
}


def _same(a, b):
    assert len(a) == len(b)
    for (p, g), (p2, g2) in zip(a, b, strict=True):
        assert torch.equal(p, p2) and torch.equal(g, g2)


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", list(MATCHERS))
def test_matcher_copies_match_identically(name, how):
    outputs, targets = random_batch(3, 40, [5, 0, 9], 4, seed=0)
    m = MATCHERS[name]()
    before = m(outputs, targets)  # fills the workspace
    c = COPIES[how](m)
    assert type(c) is type(m) and repr(c) == repr(m)
    assert c._workspace.max_bytes == m._workspace.max_bytes
    assert c._workspace.nbytes() == 0  # buffers are not copied
    _same(c(outputs, targets), before)
    _same(m(outputs, targets), before)  # the original still works after being copied


@pytest.mark.parametrize("how", list(COPIES))
def test_route_matcher_and_criterion_copy(how):
    out, targets = random_batch(2, 30, [4, 6], 3, seed=1)
    out = {**out, "aux_outputs": [{k: v + 0.01 for k, v in out.items()}]}
    h, o = HungarianMatcher(), OneToManyMatcher(k=2)
    router = RouteMatcher({"primary": h, "aux": {"o2o": h, "o2m": o}})
    crit = MultiRouteCriterion(3, router, route_weights={"aux": 0.5})
    outputs = {"primary": out, "aux": out}
    losses = crit(outputs, targets)
    c = COPIES[how](crit)
    assert set(c.matcher) == {"primary", "aux"} and c.route_weights == {"aux": 0.5}
    # shared matcher instances stay shared in the copy (pickle memo)
    assert c.matcher.matchers["primary"] is c.matcher.matchers["aux"]["o2o"]
    again = c(outputs, targets)
    assert again.keys() == losses.keys()
    for k in losses:
        torch.testing.assert_close(again[k], losses[k], rtol=0, atol=0)


def test_model_holding_criterion_deepcopies_for_ema():
    """detrex keeps the criterion inside the model; EMA helpers deep-copy the whole model."""
    model = torch.nn.Module()
    model.head = torch.nn.Linear(4, 4)
    model.criterion = MultiRouteCriterion(3, {"primary": RepeatedGTMatcher(k=2)})
    out, targets = random_batch(2, 12, [2, 3], 3, seed=2)
    model.criterion({"primary": out}, targets)
    ema = torch.optim.swa_utils.AveragedModel(model)
    torch.testing.assert_close(
        ema.module.criterion({"primary": out}, targets)["loss"],
        model.criterion({"primary": out}, targets)["loss"],
    )
    restored = _torch_save(model)
    assert torch.equal(restored.head.weight, model.head.weight)
