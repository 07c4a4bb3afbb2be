"""RouteMatcher: per-route dispatch, groups, and defaults from route supervision."""

from dataclasses import dataclass

import pytest
import torch
from test_matching_oracles import random_batch

from mrdetr.matching import HungarianMatcher, OneToManyMatcher, RouteMatcher


@dataclass
class FakeRoute:  # duck-typed stand-in for mrdetr.routes.Route
    name: str
    supervision: str


def test_for_routes_follows_supervision():
    o2o, o2m = HungarianMatcher(), OneToManyMatcher()
    routes = [FakeRoute("primary", "o2o"), FakeRoute("ffn", "o2m"), FakeRoute("both", "both")]
    router = RouteMatcher.for_routes(routes, one_to_one=o2o, one_to_many=o2m)
    assert list(router) == ["primary", "ffn", "both"] and "ffn" in router and len(router) == 3
    assert router.matchers["primary"] is o2o and router.matchers["ffn"] is o2m
    assert router.matchers["both"] == {"o2o": o2o, "o2m": o2m}
    default = RouteMatcher.for_routes(routes)
    assert isinstance(default.matchers["primary"], HungarianMatcher)
    assert isinstance(default.matchers["ffn"], OneToManyMatcher)


def test_call_dispatches_and_groups():
    outputs, targets = random_batch(2, 30, [3, 4], 5, seed=0)
    router = RouteMatcher.for_routes([FakeRoute("p", "o2o"), FakeRoute("b", "both")])
    single = router("p", outputs, targets)
    ref = HungarianMatcher()(outputs, targets)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(single, ref, strict=True)
    )
    both = router("b", outputs, targets)
    assert set(both) == {"o2o", "o2m"}
    o2m = OneToManyMatcher()(outputs, targets)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(both["o2m"], o2m, strict=True))
    assert set(router.groups("p", outputs, targets)) == {None}
    assert set(router.groups("b", outputs, targets)) == {"o2o", "o2m"}


def test_errors():
    with pytest.raises(ValueError, match="supervision.*'o2x'"):
        RouteMatcher.for_routes([FakeRoute("r", "o2x")])
    with pytest.raises(ValueError, match="'r' appears twice"):
        RouteMatcher.for_routes([FakeRoute("r", "o2o"), FakeRoute("r", "o2m")])
    with pytest.raises(ValueError, match="callable"):
        RouteMatcher({"r": 3})
    with pytest.raises(ValueError, match="mapping"):
        RouteMatcher([HungarianMatcher()])
    router = RouteMatcher({"a": HungarianMatcher()})
    with pytest.raises(ValueError, match="no matcher for route 'zz'"):
        router("zz", {}, [])


def test_supervisions_defined_once():
    import mrdetr.matching.router as router_module
    from mrdetr import routes

    assert router_module.SUPERVISIONS is routes.SUPERVISIONS
