"""JIT build: lazy, cached, concurrent-safe, one-warning fallback, finds CUDA, ships in wheels.

These tests run fresh Python processes with their own build directory, so they see first-use
behaviour whatever the test session has built already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mrdetr.ops import _toolchain

ROOT = Path(__file__).resolve().parents[1]

# Run in a child: build on first use, compare with the reference, report warnings as JSON.
CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    sys.path.insert(0, {tests!r})
    from _msda import make_inputs
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import mrdetr
        from mrdetr.ops import _build, _toolchain
        imported_clean = not _build._results
        args = make_inputs()
        out1 = mrdetr.ms_deform_attn(*args)
        out2 = mrdetr.ms_deform_attn(*args)
    ref = mrdetr.ms_deform_attn_reference(*args)
    print(json.dumps({{
        "imported_clean": imported_clean,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "cpu": _build.status("cpu"),
        "max_err": max((out1 - ref).abs().max().item(), (out2 - ref).abs().max().item()),
        "file": mrdetr.__file__,
    }}))
    """
)


def run_child(build_dir, env=None, python=sys.executable, cwd=None):
    full_env = dict(os.environ, MRDETR_BUILD_DIR=str(build_dir), **(env or {}))
    full_env.pop("MRDETR_BACKEND", None)
    code = CHILD.format(tests=str(ROOT / "tests"))
    proc = subprocess.run(
        [python, "-c", code], env=full_env, capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_builds_nothing_and_first_use_builds(tmp_path):
    result = run_child(tmp_path)
    assert result["imported_clean"], "import mrdetr must not compile anything"
    assert result["cpu"][0] is True, result["cpu"]
    assert result["warnings"] == []
    assert result["max_err"] < 1e-12
    built = list(tmp_path.rglob("mrdetr_ms_deform_attn_cpu*.so"))
    assert len(built) == 1


def test_build_is_cached_across_processes(tmp_path):
    run_child(tmp_path)
    (so,) = tmp_path.rglob("mrdetr_ms_deform_attn_cpu*.so")
    stamp = so.stat().st_mtime_ns
    result = run_child(tmp_path)
    assert result["cpu"][0] is True
    (so_again,) = tmp_path.rglob("mrdetr_ms_deform_attn_cpu*.so")
    assert so_again == so and so.stat().st_mtime_ns == stamp, "second process rebuilt the op"


def test_prebuilt_cache_loads_without_a_compiler(tmp_path):
    """A runtime image pre-built with `python -m mrdetr.ops build` needs no compiler."""
    run_child(tmp_path)
    result = run_child(tmp_path, env={"CXX": str(tmp_path / "no-compiler-here")})
    assert result["cpu"][0] is True and "loaded from the build cache" in result["cpu"][1]
    assert result["warnings"] == [] and result["max_err"] < 1e-12
    for stamp in tmp_path.rglob("*.stamp.json"):  # sources changed: the cache is not trusted
        stamp.write_text(stamp.read_text().replace('"fingerprint": "', '"fingerprint": "stale'))
    result = run_child(tmp_path, env={"CXX": str(tmp_path / "no-compiler-here")})
    assert result["cpu"][0] is False and "no C++ compiler" in result["cpu"][1]


def test_damaged_cache_is_rebuilt(tmp_path):
    run_child(tmp_path)
    (so,) = tmp_path.rglob("mrdetr_ms_deform_attn_cpu*.so")
    so.write_bytes(b"not a shared library")
    result = run_child(tmp_path)
    assert result["cpu"][0] is True and result["cpu"][1].startswith("built in"), result["cpu"]
    assert result["warnings"] == [] and result["max_err"] < 1e-12


def test_two_processes_building_at_once(tmp_path):
    env = dict(os.environ, MRDETR_BUILD_DIR=str(tmp_path))
    env.pop("MRDETR_BACKEND", None)
    code = CHILD.format(tests=str(ROOT / "tests"))
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outs:
        result = json.loads(out.strip().splitlines()[-1])
        assert result["cpu"][0] is True and result["warnings"] == [], result
        assert result["max_err"] < 1e-12


@pytest.mark.parametrize(
    "toolchain, reason",
    [("missing", "no C++ compiler"), ("broken", "building mrdetr_ms_deform_attn_cpu")],
)
def test_broken_toolchain_falls_back_with_one_warning(tmp_path, toolchain, reason):
    if toolchain == "missing":
        cxx = str(tmp_path / "no-such-compiler")
    else:
        cxx = tmp_path / "c++"
        cxx.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 1\n")
        cxx.chmod(0o755)
    result = run_child(tmp_path / "build", env={"CXX": str(cxx)})
    assert result["imported_clean"]
    assert result["cpu"][0] is False and reason in result["cpu"][1]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert reason in result["warnings"][0] and "PyTorch reference" in result["warnings"][0]
    assert result["max_err"] == 0.0  # the reference itself ran


def forced_cpu_child(**env: str) -> subprocess.CompletedProcess:
    """Call the op with ``backend="cpu"`` in a child process with ``env`` added to the
    environment; its stdout holds ``RAISED <message>`` when the call raised a RuntimeError."""
    code = textwrap.dedent(
        """
        import sys; sys.path.insert(0, {tests!r}); from _msda import make_inputs
        import mrdetr
        try:
            mrdetr.ms_deform_attn(*make_inputs(), backend="cpu")
        except RuntimeError as e:
            print("RAISED", e)
        """
    ).format(tests=str(ROOT / "tests"))
    env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_forced_backend_without_kernel_raises(tmp_path):
    out = forced_cpu_child(MRDETR_BUILD_DIR=str(tmp_path), CXX=str(tmp_path / "nope"))
    assert "RAISED" in out.stdout and "no C++ compiler" in out.stdout, out.stdout + out.stderr


def test_find_cuda_home_follows_wrapper_scripts(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-12.9"
    (toolkit / "bin").mkdir(parents=True)
    real = toolkit / "bin" / "nvcc"
    real.write_bytes(b"\x7fELF fake binary")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    inner = wrappers / "nvcc-inner"
    inner.write_text(f'#!/bin/sh\nexec "{real}" "$@"\n')
    outer = wrappers / "nvcc"
    outer.write_text(f'#!/bin/sh\n# a wrapper\nexec {inner} "$@"\n')
    for f in (inner, outer):
        f.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ['PATH']}")
    root, how = _toolchain.find_cuda_home()
    assert root == str(toolkit), how
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "empty"))
    root, how = _toolchain.find_cuda_home()
    assert root is None and "has no bin/nvcc" in how
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert _toolchain.find_cuda_home() == (str(toolkit), "$CUDA_HOME")


def _cuda_toolchain_present():
    return torch.version.cuda is not None and _toolchain.find_cuda_home()[0] is not None


@pytest.mark.skipif(
    not _cuda_toolchain_present() and not os.environ.get("MRDETR_REQUIRE_CUDA_BUILD"),
    reason="needs a CUDA build of torch and a CUDA toolkit (set MRDETR_REQUIRE_CUDA_BUILD=1 "
    "to make this a failure instead)",
)
def test_cuda_extension_compiles_links_and_registers(tmp_path):
    """Runs without a GPU: the kernels cannot run here, but build and registration can. The
    CUDA library is built and loaded alone: it needs nothing from the CPU one."""
    code = textwrap.dedent(
        """
        import json, torch
        from mrdetr.ops import _build
        ok, reason = _build.load("cuda")
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        ops = ("mrdetr::ms_deform_attn_forward", "mrdetr::ms_deform_attn_backward")
        print(json.dumps({"ok": ok, "reason": reason, "cpu_tried": _build.status("cpu"),
                          "cuda": [has(op, "CUDA") for op in ops],
                          "cpu": [has(op, "CPU") for op in ops]}))
        """
    )
    env = dict(os.environ, MRDETR_BUILD_DIR=os.environ.get("MRDETR_BUILD_DIR", str(tmp_path)))
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # one architecture keeps it short
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], result["reason"]
    assert result["cuda"] == [True, True]
    assert result["cpu_tried"] is None and result["cpu"] == [False, False]


def test_prebuild_command(tmp_path):
    env = dict(os.environ, MRDETR_BUILD_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "mrdetr.ops", "build"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cpu" in out.stdout and "available" in out.stdout
    assert list(tmp_path.rglob("mrdetr_ms_deform_attn_cpu*.so"))


def test_wheel_ships_the_sources(tmp_path):
    """A non-editable install from a built wheel, in a fresh virtualenv, JIT-builds the op."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist,
         str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = dist.glob("mrdetr-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    # torch & co. come from this environment; mrdetr only from the wheel
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, wheel],
        check=True, capture_output=True,
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = run_child(tmp_path / "build", python=str(venv / "bin" / "python"), cwd=work)
    assert result["file"].startswith(str(site)), result["file"]
    assert result["cpu"][0] is True, result["cpu"]
    assert result["max_err"] < 1e-12
    assert (site / "mrdetr" / "_csrc" / "ms_deform_attn" / "ms_deform_attn.h").is_file()


def test_pip_ninja_is_found_off_path(monkeypatch):
    """An un-activated virtualenv: pip's ninja is not on PATH, the build puts it there."""
    ninja = pytest.importorskip("ninja")
    real_which = _toolchain.shutil.which
    monkeypatch.setattr(
        _toolchain.shutil, "which", lambda cmd, *a, **k: None if cmd == "ninja" else real_which(cmd)
    )
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert _toolchain.missing_tools("cpu") is None
    assert os.environ["PATH"] == "/usr/bin:/bin", "a query must not change the environment"
    _toolchain.cpp_extension("cpu")
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
