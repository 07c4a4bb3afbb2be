"""The family checks (tests/_hf_family_checks.py) on HF Deformable-DETR and RT-DETR."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import _hf_family_checks as checks  # noqa: E402

from mrdetr.testing.hf_families import family_available  # noqa: E402

FAMILIES = [f for f in ("deformable_detr", "rt_detr") if family_available(f)]


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_bitwise(family):
    checks.check_eval_bitwise(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_primary_equals_unwrapped(family):
    checks.check_train_primary(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_route_loss(family):
    checks.check_route_loss(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family, tmp_path):
    checks.check_round_trip(family, tmp_path)
