"""Routes: the dataclass, validation and the presets (checked against the paper's table)."""

import dataclasses

import pytest

from mrdetr import routes
from mrdetr.routes import Route

# Paper table, written from the project page: (routes, owned sub-layers of each aux route, AP)
PAPER = {
    1: (1, [], "47.6"),
    2: (1, [], "41.6"),
    3: (2, [{"sa"}], "49.7"),
    4: (2, [{"ca"}], "49.2"),
    5: (2, [{"ffn"}], "49.6"),
    6: (2, [{"ca", "ffn"}], "49.4"),
    7: (2, [{"sa", "ffn"}], "49.4"),
    8: (2, [{"sa", "ca"}], "49.2"),
    9: (3, [{"sa"}, {"ca"}], "49.4"),
    10: (3, [{"sa"}, {"ffn"}], "50.0"),
    11: (3, [{"ca"}, {"ffn"}], "49.0"),
    12: (4, [{"sa"}, {"ca"}, {"ffn"}], "49.6"),
}


def owned(r: Route) -> set[str]:
    flags = {"sa": r.own_self_attn, "ca": r.own_cross_attn, "ffn": r.own_ffn}
    return {k for k, v in flags.items() if v}


def test_route_is_frozen_with_matcher_fields():
    r = Route("aux", supervision="o2m", own_ffn=True)
    assert (r.name, r.supervision) == ("aux", "o2m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "other"


def test_mr_detr_preset():
    rs = routes.mr_detr()
    assert [r.name for r in rs] == ["primary", "aux_ffn", "aux_instruct"]
    assert [r.supervision for r in rs] == ["o2o", "o2m", "o2m"]
    assert owned(rs[0]) == set() and rs[0].num_instruction_tokens == 0
    assert owned(rs[1]) == {"ffn"} and rs[1].num_instruction_tokens == 0
    assert owned(rs[2]) == set() and rs[2].num_instruction_tokens == 10
    assert routes.mr_detr(num_instruction_tokens=3)[2].num_instruction_tokens == 3
    assert "50.7" in routes.mr_detr.__doc__


def test_baseline_preset():
    (r,) = routes.baseline()
    assert r.name == "primary" and r.supervision == "o2o" and r.is_plain


@pytest.mark.parametrize("row", sorted(PAPER))
def test_paper_ablation_rows(row):
    n_routes, aux_owned, ap = PAPER[row]
    rs = routes.paper_ablation(row)
    assert len(rs) == n_routes
    assert rs[0].is_plain
    assert rs[0].supervision == ("both" if row == 2 else "o2o")
    assert [owned(r) for r in rs[1:]] == aux_owned
    assert all(r.supervision == "o2m" and r.num_instruction_tokens == 0 for r in rs[1:])
    assert ap in routes.paper_ablation.__doc__
    assert routes.validate_routes(rs) == rs


@pytest.mark.parametrize("row", [0, 13, "3", 2.0, True])
def test_paper_ablation_bad_row(row):
    with pytest.raises(ValueError, match="row"):
        routes.paper_ablation(row)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="a b"), "name"),
        (dict(name="a", supervision="one2many"), "supervision"),
        (dict(name="a", num_instruction_tokens=-1), "num_instruction_tokens"),
    ],
)
def test_route_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Route(**kwargs)


@pytest.mark.parametrize(
    "rs, match",
    [
        ((), "at least"),
        ((Route("aux", supervision="o2m"),), "primary"),
        ((Route("p", own_ffn=True),), "primary"),
        ((Route("p", num_instruction_tokens=2),), "primary"),
        ((Route("p"), Route("p", supervision="o2m")), "unique"),
        ((Route("p"), "aux"), r"routes\[1\]"),
    ],
)
def test_validate_routes_rejects(rs, match):
    with pytest.raises(ValueError, match=match):
        routes.validate_routes(rs)
