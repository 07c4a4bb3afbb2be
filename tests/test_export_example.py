"""examples/export.py on a tiny random toy detector: both runtimes within fp32 tolerance."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example():
    spec = importlib.util.spec_from_file_location("export_example", EXAMPLES / "export.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["export_example"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_export_example_reports_both_runtimes_and_fails_beyond_tolerance(tmp_path, capsys):
    """One export (it is slow): with zero tolerance the run must fail (onnxruntime's kernels
    differ from PyTorch's in the last bits), and the printed differences must be fp32-small."""
    ex = load_example()
    args = ["--quick", "--out", str(tmp_path), "--runs", "1", "--atol", "0", "--rtol", "0"]
    assert ex.main(args) == 1
    printed = capsys.readouterr().out
    assert "onnxruntime" in printed.split("FAILED:")[1]
    diffs = {}
    for line in printed.splitlines():
        parts = line.split()
        if parts and parts[0] in ("eager", "torch.export", "onnxruntime"):
            diffs[parts[0]] = float(parts[1])
    assert diffs["eager"] == 0.0 and diffs["torch.export"] <= 1e-5
    assert 0.0 < diffs["onnxruntime"] <= 1e-4
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / "model.onnx").is_file()


def test_within_applies_atol_and_rtol():
    ex = load_example()
    expected = (torch.tensor([1.0, 100.0]),)
    assert ex.within((torch.tensor([1.0 + 1e-5, 100.0 + 1e-3]),), expected, 2e-5, 1e-5)[1]
    diff, ok = ex.within((torch.tensor([1.0, 100.01]),), expected, 2e-5, 1e-5)
    assert not ok and diff == pytest.approx(0.01, rel=1e-3)
    assert ex.within((torch.zeros(3),), (torch.zeros(2),), 1.0, 1.0) == (float("inf"), False)


def test_loads_the_demo_checkpoint_from_its_out_folder(tmp_path):
    """A checkpoint in the demo's layout (``<out>/<run>/last.pt``) loads, stripped, in eval."""
    ex = load_example()
    from toy.model import ToyDETRConfig, build_model

    cfg = ToyDETRConfig(routes="mr_detr", two_stage=True, **ex.QUICK_MODEL)
    torch.manual_seed(1)
    trained = build_model(cfg)
    (tmp_path / "mr_detr").mkdir()
    state = {"model": trained.state_dict(), "model_cfg": cfg.to_dict(), "history": {"steps": 7}}
    torch.save(state, tmp_path / "mr_detr" / "last.pt")
    loaded = ex.load_model(str(tmp_path), quick=False, seed=0)
    assert not loaded.training and len(loaded.model.decoder.routes) == 1
    params = dict(loaded.model.named_parameters())
    assert params and not any(".aux." in name for name in params)
    for name, p in params.items():
        torch.testing.assert_close(p, trained.state_dict()[name], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        ex.load_model(str(tmp_path / "nothing_here"), quick=False, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no <run>/last.pt"):
        ex.load_model(str(tmp_path / "empty"), quick=False, seed=0)
