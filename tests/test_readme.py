"""The README's quick start runs, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quick_start_runs_and_is_short():
    section = README.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert namespace["out"].shape == (3, 2, 300, 256)
    assert torch.isfinite(namespace["out"]).all()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(make \w+)\s+#", README, re.M)
    assert "make test" in commands and "make demo" in commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in [line.strip() for line in ci]
