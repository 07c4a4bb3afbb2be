"""DETR and Table Transformer (transformers 4.57 and 5.x) under mrdetr's routes: the checks every
HF family passes (tests/_hf_family_checks.py), plus the route hidden states against the
decoder's own final norm and each auxiliary route against its own plain pass."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _hf_family_checks import (  # noqa: E402
    check_eval_bitwise,
    check_round_trip,
    check_route_loss,
    check_train_primary,
)

from mrdetr.testing.hf_families import family_available  # noqa: E402

FAMILIES = [
    pytest.param(f, marks=pytest.mark.skipif(not family_available(f), reason=f"no {f}"))
    for f in ("detr", "table_transformer")
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_bitwise(family):
    check_eval_bitwise(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_primary_equals_unwrapped(family):
    check_train_primary(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_route_loss_reaches_every_added_parameter(family):
    check_route_loss(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family, tmp_path):
    check_round_trip(family, tmp_path)
