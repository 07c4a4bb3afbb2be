"""The examples run, and the end-to-end one shows the pieces train together."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from mrdetr import routes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_train_step_learns_and_strips_to_a_plain_decoder():
    ex = load("train_step")
    model, totals, primary = ex.train(steps=40)
    assert totals[-1] < 0.5 * totals[0] and primary[-1] < 0.5 * primary[0], (totals, primary)
    memory, shapes, starts, _ = ex.random_batch()
    model.eval()
    with torch.no_grad():
        before = model(memory, shapes, starts)
    assert list(before) == ["primary"]
    model.decoder.strip_auxiliary()
    assert not any(".aux." in name for name, _ in model.decoder.named_parameters())
    plain = ex.plain_decoder()
    assert plain.routes == routes.baseline()
    plain.load_state_dict(model.decoder.state_dict())
    model.decoder = plain.eval()
    with torch.no_grad():
        after = model(memory, shapes, starts)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(after["primary"][key], before["primary"][key])


def test_op_demo_runs_every_available_backend(capsys):
    load("op_demo").main()
    out = capsys.readouterr().out
    assert "cpu: pytorch reference" in out and "cpu: compiled kernel" in out
