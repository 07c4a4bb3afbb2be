"""The checks every HF DETR family with a training loss passes (tests/_hf_family_checks.py:
eval bitwise equal to the unwrapped model; with every auxiliary weight 0 the training loss and
outputs of the unwrapped model, denoising included; the routes' losses reach every parameter
they add and the primary loss none; unwrap + save_pretrained + from_pretrained). OmDet-Turbo,
which has no loss in transformers, has its own version in tests/test_hf_family_omdet.py; each
family group's own tests are in the other tests/test_hf_family_*.py files."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import _hf_family_checks as checks  # noqa: E402
from _threads import intra_op_threads  # noqa: E402

from mrdetr.testing.hf_families import FAMILIES as ALL  # noqa: E402
from mrdetr.testing.hf_families import family_available

FAMILIES = [
    pytest.param(f, marks=pytest.mark.skipif(not family_available(f), reason=f"no {f}"))
    for f in ALL
    if f != "omdet_turbo"
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with intra_op_threads(1):  # tiny models: one thread is faster on a shared machine
        yield


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
