"""A criterion call reads the device once (matching.transfer.to_host) and writes back once,
whatever the number of routes and layers; counted by a spy and by OpCounter."""

import pytest
import torch

from mrdetr import routes
from mrdetr.criterion import MultiRouteCriterion
from mrdetr.matching import (
    HungarianMatcher,
    OneToManyMatcher,
    RepeatedGTMatcher,
    RouteMatcher,
    transfer,
)
from mrdetr.profiling import OpCounter


def batch(route_names, layers, enc, b=3, q=12, k=5, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def pred(n):
        logits = torch.randn(b, n, k, generator=gen).requires_grad_()
        boxes = (torch.rand(b, n, 4, generator=gen) * 0.4 + 0.2).requires_grad_()
        return {"pred_logits": logits, "pred_boxes": boxes}

    outputs = {}
    for name in route_names:
        sets = [pred(q) for _ in range(layers)]
        out = {**sets[-1], "aux_outputs": sets[:-1]}
        if enc:
            out["enc_outputs"] = pred(q + 5)
        outputs[name] = out
    targets = []
    for i in range(b):
        n = (0, 2, 4)[i % 3]
        boxes = torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2, torch.rand(n, 2) * 0.2], 1)
        targets.append({"labels": torch.randint(0, k, (n,), generator=gen), "boxes": boxes})
    return outputs, targets


@pytest.fixture
def spy(monkeypatch):
    calls = {"to_host": 0, "to_device": 0}
    for name in calls:
        real = getattr(transfer, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(transfer, name, wrapper)
    return calls


@pytest.mark.parametrize(("layers", "enc"), [(6, True), (1, False), (3, True)])
def test_three_routes_one_read_one_write(spy, layers, enc):
    criterion = MultiRouteCriterion(5, RouteMatcher.for_routes(routes.mr_detr()))
    outputs, targets = batch(["primary", "aux_ffn", "aux_instruct"], layers, enc)
    with OpCounter() as count:
        losses = criterion(outputs, targets)
    assert spy == {"to_host": 1, "to_device": 1}
    assert count.host_reads == 1, dict(count.read_ops)  # the one to_host
    assert len([k for k in losses if k.startswith("loss_class/")]) == 3 * (layers + enc)
    with OpCounter() as count:
        losses["loss"].backward()
    assert count.host_reads == 0, dict(count.read_ops)


def test_matcher_groups_and_repeated_gt_one_read(spy):
    matcher = RouteMatcher(
        {
            "primary": HungarianMatcher(),
            "both": {"o2o": HungarianMatcher(class_cost="softmax"), "o2m": OneToManyMatcher()},
            "hybrid": RepeatedGTMatcher(k=3),
        }
    )
    criterion = MultiRouteCriterion(5, matcher)
    outputs, targets = batch(["primary", "both", "hybrid"], 6, True)
    with OpCounter() as count:
        criterion(outputs, targets)
    assert spy == {"to_host": 1, "to_device": 1}
    assert count.host_reads == 1, dict(count.read_ops)


@pytest.mark.parametrize(
    "matcher", [HungarianMatcher(), OneToManyMatcher(), RepeatedGTMatcher(k=2)], ids=repr
)
def test_standalone_matcher_one_read(spy, matcher):
    outputs, targets = batch(["p"], 1, False)
    with OpCounter() as count:
        matcher(outputs["p"], targets)
    assert spy == {"to_host": 1, "to_device": 1}
    assert count.host_reads == 1, dict(count.read_ops)


def test_user_matcher_checks_ride_on_the_same_read(spy):
    def user(outputs, targets):
        return [(torch.arange(len(t["labels"])), torch.arange(len(t["labels"]))) for t in targets]

    criterion = MultiRouteCriterion(5, {"primary": user, "aux": OneToManyMatcher()})
    outputs, targets = batch(["primary", "aux"], 2, False)
    with OpCounter() as count:
        criterion(outputs, targets)
    assert spy["to_host"] == 1
    assert count.host_reads == 1, dict(count.read_ops)
