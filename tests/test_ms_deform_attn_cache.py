"""Build cache: pure status query, verified libraries, unusable build folders, CPU ISA flags.

Like test_ms_deform_attn_build.py, the tests that build run fresh processes with their own
build directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_ms_deform_attn_build import ROOT, forced_cpu_child, run_child

from mrdetr.ops import _build, _toolchain

QUERY = textwrap.dedent(
    """
    import json, warnings
    warnings.simplefilter("always")
    from mrdetr.ops import _build, available_backends
    status = available_backends()
    print(json.dumps({"status": {k: list(v) for k, v in status.items()},
                      "tried": _build.status("cpu")}))
    """
)


def _query(build_dir, **env):
    full = dict(os.environ, MRDETR_BUILD_DIR=str(build_dir), **env)
    proc = subprocess.run(
        [sys.executable, "-c", QUERY], env=full, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_available_backends_is_a_pure_query(tmp_path):
    """It builds nothing, says what a first call would do, and sees a finished build."""
    result = _query(tmp_path)
    available, reason, built = result["status"]["cpu"]
    assert result["tried"] is None and not list(tmp_path.rglob("*.so")), "a query compiled"
    assert available and not built and "not built yet" in reason
    run_child(tmp_path)  # a first call builds
    available, reason, built = _query(tmp_path)["status"]["cpu"]
    assert available and built and "built (" in reason
    _, reason, _ = _query(tmp_path, CXX=str(tmp_path / "nope"))["status"]["cpu"]
    assert "built (" in reason, "a verified cached library needs no compiler"
    available, reason, built = _query(tmp_path / "b", CXX=str(tmp_path / "nope"))["status"]["cpu"]
    assert not available and not built and "no C++ compiler" in reason


def test_truncated_library_is_rebuilt_not_loaded(tmp_path):
    """An interrupted copy leaves a truncated .so; loading it would die with SIGBUS."""
    run_child(tmp_path)
    (so,) = tmp_path.rglob("mrdetr_ms_deform_attn_cpu*.so")
    data = so.read_bytes()
    so.write_bytes(data[: len(data) // 2])
    result = run_child(tmp_path)  # asserts the child exited cleanly
    assert result["cpu"][0] is True and result["cpu"][1].startswith("built in"), result["cpu"]
    assert result["max_err"] < 1e-12
    so.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    result = run_child(tmp_path)
    assert result["cpu"][1].startswith("built in"), "a library whose hash differs was loaded"


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_unusable_build_dir_falls_back_or_explains(tmp_path, where):
    if where == "file":
        build_dir = tmp_path / "a-file"
        build_dir.write_text("")
    else:
        build_dir = tmp_path / "read-only"
        build_dir.mkdir()
        build_dir.chmod(0o555)
        if os.access(build_dir, os.W_OK):  # root ignores the mode: use a folder nobody writes
            build_dir = "/sys/mrdetr-build"  # sysfs refuses mkdir, even to root
    result = run_child(build_dir)  # backend="auto": the reference, one warning
    assert result["cpu"][0] is False and "build directory" in result["cpu"][1], result["cpu"]
    assert len(result["warnings"]) == 1 and "build directory" in result["warnings"][0]
    assert result["max_err"] == 0.0
    available, reason, _ = _query(build_dir)["status"]["cpu"]
    assert not available and "build directory" in reason, reason
    out = forced_cpu_child(MRDETR_BUILD_DIR=str(build_dir))
    assert out.returncode == 0 and "RAISED" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "build directory" in out.stdout


def test_cpu_isa_detection(monkeypatch):
    monkeypatch.setattr(_toolchain, "_cpu_flags", lambda: {"sse2", "avx2", "fma", "f16c"})
    monkeypatch.setattr(_toolchain.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(_toolchain.sys, "platform", "linux")
    monkeypatch.delenv(_toolchain.ISA_ENV_VAR, raising=False)
    assert _toolchain.cpu_isa() == ("avx2", ["-mavx2", "-mfma", "-mf16c"])
    monkeypatch.setenv(_toolchain.ISA_ENV_VAR, "generic")
    assert _toolchain.cpu_isa() == ("generic", [])
    monkeypatch.setenv(_toolchain.ISA_ENV_VAR, "avx9000")
    with pytest.raises(ValueError, match="MRDETR_CPU_ISA"):
        _toolchain.cpu_isa()
    monkeypatch.delenv(_toolchain.ISA_ENV_VAR)
    monkeypatch.setattr(_toolchain, "_cpu_flags", lambda: {"sse2", "avx2"})  # no FMA
    assert _toolchain.cpu_isa() == ("generic", [])
    monkeypatch.setattr(_toolchain, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setattr(_toolchain.platform, "machine", lambda: "aarch64")
    assert _toolchain.cpu_isa() == ("generic", [])


def test_isa_flags_are_in_the_fingerprint_and_the_folder():
    """A cache shared by two CPUs keeps one library per instruction set."""
    include = str(_build.sources_root())
    generic = _toolchain.compile_flags("cpu", [], include)
    avx2 = _toolchain.compile_flags("cpu", ["-mavx2", "-mfma", "-mf16c"], include)
    assert _build._fingerprint("cpu", generic) != _build._fingerprint("cpu", avx2)
    assert _build.build_directory("cpu", "avx2") != _build.build_directory("cpu", "generic")


@pytest.mark.slow
def test_failing_isa_build_retries_generic(tmp_path):
    """A compiler that rejects the ISA flags: the generic build is used, and says why."""
    cxx = tmp_path / "c++"
    cxx.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = "-mfma" ] && { echo "no FMA here" >&2; exit 1; }; '
        'done\nexec c++ "$@"\n'
    )
    cxx.chmod(0o755)
    code = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, {tests!r}); from _msda import make_inputs
        from mrdetr.ops import _build, _toolchain
        _toolchain.cpu_isa = lambda: ("avx2", ["-mavx2", "-mfma", "-mf16c"])
        import mrdetr
        out = mrdetr.ms_deform_attn(*make_inputs(), backend="cpu")
        ref = mrdetr.ms_deform_attn_reference(*make_inputs())
        print(json.dumps({{"cpu": _build.status("cpu"), "err": (out - ref).abs().max().item()}}))
        """
    ).format(tests=str(ROOT / "tests"))
    env = dict(os.environ, MRDETR_BUILD_DIR=str(tmp_path / "build"), CXX=str(cxx))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ok, reason = result["cpu"]
    assert ok and "cpu-generic" in reason and "the avx2 build failed" in reason, reason
    assert result["err"] < 1e-12
