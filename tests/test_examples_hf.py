"""examples/hf_deformable_detr.py and examples/hf_rt_detr.py: train with the routes, eval and
save/from_pretrained equal the unwrapped model, and the scripts exit non-zero when they do not."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_deformable_detr", "hf_rt_detr"])
def test_example_trains_every_route_and_round_trips(name, capsys, tmp_path):
    summary = load(name).main(["--steps", "2"])
    assert summary["eval_equal"] and summary["keys_equal"] and summary["reload_equal"]
    for route in ("primary", "aux_ffn", "aux_instruct"):  # every route has a loss each step
        assert math.isfinite(summary["last"][route]) and summary["last"][route] > 0, summary
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("steps 2:")
    assert sum("aux_instruct" in line for line in lines) >= 2  # a loss line per step


@pytest.mark.slow
def test_example_exits_non_zero_on_a_mismatch(monkeypatch, tmp_path):
    ex = load("hf_deformable_detr")
    real_equal = torch.equal
    monkeypatch.setattr(ex.torch, "equal", lambda a, b: real_equal(a, b) and False)
    with pytest.raises(SystemExit) as err:
        ex.main(["--steps", "1"])
    assert err.value.code == 1
