"""Toy demo faults: a failing evaluation keeps the training; resume applies a new lr and refuses a
changed model, naming the option."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from toy import train as toy_train  # noqa: E402
from toy.data import make_dataset  # noqa: E402
from toy.evaluate import evaluate  # noqa: E402
from toy.model import ToyDETRConfig  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    cfg = ToyDETRConfig(routes="mr_detr", dim=32, num_heads=4, ffn_dim=64, num_queries=10,
                        num_instruction_tokens=2, two_stage=True, backbone_width=8)  # fmt: skip
    tcfg = toy_train.TrainConfig(steps=6, batch_size=4, eval_every=3, warmup=2, lr=1e-3)
    return cfg, tcfg, make_dataset(16, 32, seed=0), make_dataset(4, 32, seed=1)


def _train(setup, run_dir, **kw):
    cfg, tcfg, train_set, val_set = setup
    cfg, tcfg = kw.pop("cfg", cfg), kw.pop("tcfg", tcfg)
    return toy_train.train(cfg, tcfg, train_set, val_set, run_dir, progress=False, **kw)


def test_failing_evaluation_keeps_the_checkpoint_and_resume_completes_the_run(
    setup, tmp_path, monkeypatch
):
    full, _ = _train(setup, tmp_path / "full")

    def broken(model, data):
        raise TypeError("unsupported format string passed to NoneType")

    monkeypatch.setattr(toy_train, "evaluate", broken)
    with pytest.raises(RuntimeError, match=r"evaluation at step 3 failed.*--resume") as info:
        _train(setup, tmp_path / "cut")
    assert str(tmp_path / "cut" / "last.pt") in str(info.value)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert saved["history"]["steps"] == 3 and saved["history"]["evals"] == []
    monkeypatch.setattr(toy_train, "evaluate", evaluate)
    resumed, hist = _train(setup, tmp_path / "cut", resume=True)
    assert [e["step"] for e in hist["evals"]] == [3, 6]  # the missed evaluation is run first
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_with_a_new_lr_applies_it_and_records_it(setup, tmp_path):
    cfg, tcfg, _, _ = setup
    _train(setup, tmp_path / "a", tcfg=replace(tcfg, steps=3))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same, _ = _train(setup, tmp_path / "a", resume=True)
    new_lr, _ = _train(setup, tmp_path / "b", resume=True, tcfg=replace(tcfg, lr=1.0))
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["train_cfg"]["lr"] == 1.0
    # after 6 steps of 6 (warm-up 2 done, past the drop at 80 %): lr = 1.0 * 0.1
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([0.1])
    old = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    assert [g["lr"] for g in old["optimizer"]["param_groups"]] == pytest.approx([1e-4])
    a, b = same.state_dict(), new_lr.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the new rate was used


@pytest.mark.parametrize(
    ("change", "option"),
    [({"num_queries": 12}, "--num-queries"), ({"dim": 64}, "--dim"),
     ({"two_stage": False}, "--two-stage")],
)  # fmt: skip
def test_resume_with_a_changed_model_names_the_option(setup, tmp_path, change, option):
    cfg, tcfg, _, _ = setup
    _train(setup, tmp_path, tcfg=replace(tcfg, steps=3))
    key = next(iter(change))
    with pytest.raises(ValueError, match=rf"{key}=.*{option}") as info:
        _train(setup, tmp_path, resume=True, cfg=replace(cfg, **change))
    assert "last.pt" in str(info.value)
