"""examples/wrap_torch_decoder.py: trains with the routes, eval and reload equal the unwrapped
model, and the script exits non-zero when they do not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "examples" / "wrap_torch_decoder.py"


def load():
    spec = importlib.util.spec_from_file_location("wrap_torch_decoder", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["wrap_torch_decoder"] = module
    spec.loader.exec_module(module)
    return module


def test_example_trains_every_route_and_round_trips(capsys):
    ex = load()
    summary = ex.main(["--steps", "6"])
    assert summary["eval_equal"] and summary["reload_equal"]
    for route in ("primary", "aux_ffn", "aux_instruct"):  # every route learns
        assert summary["last"][route] < 0.8 * summary["first"][route], summary
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("steps 6:")


def test_example_exits_non_zero_on_a_mismatch(monkeypatch):
    ex = load()
    real_equal = torch.equal
    monkeypatch.setattr(ex.torch, "equal", lambda a, b: real_equal(a, b) and False)
    with pytest.raises(SystemExit) as err:
        ex.main(["--steps", "1"])
    assert err.value.code == 1
