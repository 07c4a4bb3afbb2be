"""Toy demo command line: device choice, bf16 refused on the CPU, GPU preset, progress bars off
without a terminal, interleaved step cost, report wording."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from toy import cli  # noqa: E402
from toy.report import write_report  # noqa: E402


def test_device_auto_cpu_and_refusals(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device(cli.parse_args([])) == torch.device("cpu")
    with pytest.raises(SystemExit, match="--device cuda: torch.cuda.is_available"):
        cli.resolve_device(cli.parse_args(["--device", "cuda"]))
    with pytest.raises(SystemExit, match="--amp bf16 needs a CUDA device"):
        cli.resolve_device(cli.parse_args(["--amp", "bf16"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.resolve_device(cli.parse_args([])) == torch.device("cuda", 1)
    assert cli.resolve_device(cli.parse_args(["--device", "cpu"])) == torch.device("cpu")


def test_gpu_preset_on_cuda_and_explicit_options_win():
    args = cli.parse_args([])
    _, _, on_cpu = cli.settings(args, torch.device("cpu"))
    _, _, on_gpu = cli.settings(args, torch.device("cuda", 0))
    assert (on_cpu.batch_size, on_gpu.batch_size) == (8, 32)
    assert on_gpu.steps == on_cpu.steps
    _, _, quick = cli.settings(
        cli.parse_args(["--quick", "--batch-size", "4"]), torch.device("cuda")
    )
    assert quick.batch_size == 4 and quick.steps == cli.QUICK["steps"]


def test_progress_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.show_progress(cli.parse_args([]))
    assert not cli.show_progress(cli.parse_args(["--no-progress"]))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert not cli.show_progress(cli.parse_args([]))


def test_step_cost_is_measured_for_every_route_set():
    from toy.cost import measure_step_cost
    from toy.data import make_dataset
    from toy.model import ToyDETRConfig
    from toy.train import TrainConfig

    cfg = ToyDETRConfig(dim=32, num_heads=4, ffn_dim=64, num_queries=10,
                        num_instruction_tokens=2, backbone_width=8)  # fmt: skip
    cost = measure_step_cost(cfg, TrainConfig(batch_size=2), make_dataset(4, 32, 0),
                             ["baseline", "mr_detr"], steps=2, warmup=1)  # fmt: skip
    assert set(cost) == {"baseline", "mr_detr"} and min(cost.values()) > 0


def _run(ap, steps=100):
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return {**dict.fromkeys(keys, ap), "steps": steps, "seconds_per_step": 0.1}


def test_report_quick_is_a_smoke_test_and_full_gives_both_comparisons(tmp_path):
    runs = {"baseline": _run(0.071), "mr_detr": _run(0.063)}
    line = write_report(runs, tmp_path / "q.md", quick=True)
    text = (tmp_path / "q.md").read_text()
    assert "smoke test" in line.lower() and "too short to compare methods" in text
    assert "won" not in text and "0.071" in text and "7.1" not in text
    cost = {"device": "cuda:0", "seconds_per_step": {"baseline": 0.02, "mr_detr": 0.025}}
    line = write_report({"baseline": _run(0.30, 2000), "mr_detr": _run(0.36, 2000)},
                        tmp_path / "f.md", cost=cost, equal_time=_run(0.33, 2500))  # fmt: skip
    text = (tmp_path / "f.md").read_text()
    assert line.startswith("mr_detr won at equal steps: primary-route AP 0.360 vs 0.300")
    assert "costs 1.25x a baseline step" in text and "measured interleaved" in text
    assert "At equal training time (the baseline trained 2500 steps" in text
    assert "Mr. DETR AP 0.360 vs baseline 0.330" in text


def test_bf16_step_trains_or_says_to_run_without_amp():
    # the op may not support autocast yet: then the step says so, naming --amp
    from toy.data import batch, make_dataset
    from toy.model import ToyDETRConfig
    from toy.train import TrainConfig, build_criterion, init_model, train_step

    cfg = ToyDETRConfig(routes="mr_detr", dim=32, num_heads=4, ffn_dim=64, num_queries=10,
                        num_instruction_tokens=2, backbone_width=8, two_stage=True)  # fmt: skip
    model = init_model(cfg, 0)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    images, targets = batch(make_dataset(2, 32, 0), [0, 1])
    try:
        losses = train_step(model, build_criterion(model, TrainConfig()), opt, images, targets,
                            0.1, amp="bf16")  # fmt: skip
    except RuntimeError as e:
        assert str(e).startswith("--amp bf16: the training step failed") and "without --amp" in str(
            e
        )
    else:
        assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
