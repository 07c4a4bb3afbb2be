"""A first build killed mid-way leaves torch's ``lock`` file: later builds must not wait on it."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from mrdetr.ops import _build, _toolchain

ROOT = Path(__file__).resolve().parents[1]


def _stale_lock(kind: str, isa: str) -> Path:
    """torch's baton file as a SIGKILLed build leaves it (its owner is gone)."""
    folder = _build.build_directory(kind, isa)
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.write_text("")
    return lock


def test_stale_torch_lock_is_removed_before_building(tmp_path, monkeypatch):
    """Fast: torch's loader replaced by one that takes the baton as torch does and fails
    (instead of waiting forever) if the stale file is still there."""
    monkeypatch.setenv("MRDETR_BUILD_DIR", str(tmp_path))
    lock = _stale_lock("cpu", "generic")
    calls = []

    def load(name, sources, build_directory, **kwargs):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        assert baton.try_acquire(), "torch's loader would wait on the stale lock forever"
        try:
            Path(build_directory, f"{name}.so").write_bytes(b"not a real library")
            calls.append(name)
        finally:
            baton.release()

    monkeypatch.setattr(_toolchain, "cpp_extension", lambda kind: types.SimpleNamespace(load=load))
    monkeypatch.setattr(_toolchain, "missing_tools", lambda kind: None)
    ok, reason = _build._compile("cpu", "generic", [])
    assert ok, reason
    assert calls == ["mrdetr_ms_deform_attn_cpu_generic"]
    assert not lock.exists()


CHILD = """
import sys
from mrdetr.ops import _build
print(_build._compile("cpu", "generic", []))
"""


@pytest.mark.slow
def test_real_build_proceeds_past_a_stale_lock(tmp_path):
    """A real CPU build (10-60 s) in a fresh build folder that holds a stale ``lock``."""
    env = dict(os.environ, MRDETR_BUILD_DIR=str(tmp_path))
    code = f"import os; os.environ['MRDETR_BUILD_DIR'] = {str(tmp_path)!r}\n" + CHILD
    folder_code = (
        "from mrdetr.ops import _build; p = _build.build_directory('cpu', 'generic'); "
        "p.mkdir(parents=True); (p / 'lock').write_text('')"
    )
    subprocess.run([sys.executable, "-c", folder_code], cwd=ROOT, env=env, check=True)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(True, 'built in" in proc.stdout, proc.stdout + proc.stderr[-2000:]
