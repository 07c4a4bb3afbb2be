"""Just-in-time build of the C++/CUDA kernels, with a cache and a reason for every failure.

Nothing here runs at ``import mrdetr``: the CPU extension is built on the first CPU call, the
CUDA one on the first CUDA call. ``torch.utils.cpp_extension.load`` keeps the build in a
directory per torch/CUDA/Python version (reused by later processes) and serialises concurrent
builds of the same extension with a lock file in that directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch

__all__ = ["load", "status", "find_cuda_home", "sources_root", "build_directory"]

_lock = threading.RLock()
_results: dict[str, tuple[bool, str]] = {}
_EXEC = re.compile(r"""^\s*exec\s+["']?(/[^\s"']+)""", re.MULTILINE)


def sources_root() -> Path:
    """The ``ms_deform_attn`` sources: ``csrc/`` of a checkout, or ``mrdetr/_csrc`` in a wheel."""
    here = Path(__file__).resolve().parent.parent  # mrdetr/
    for root in (here.parent / "csrc", here / "_csrc"):
        if (root / "ms_deform_attn" / "ms_deform_attn.h").is_file():
            return root / "ms_deform_attn"
    raise FileNotFoundError(
        f"mrdetr's C++ sources are missing (looked in {here.parent}/csrc and {here}/_csrc)"
    )


def build_directory(kind: str) -> Path:
    """Build folder of the ``kind`` ("cpu"/"cuda") extension, under ``$MRDETR_BUILD_DIR``."""
    base = os.environ.get("MRDETR_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mrdetr"
    )
    cuda = torch.version.cuda or "cpu"
    py = f"{sys.version_info[0]}{sys.version_info[1]}"
    tag = f"torch{torch.__version__.split('+')[0]}-cu{cuda}-py{py}"
    path = Path(base) / tag / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def _real_nvcc(path: str, depth: int = 0) -> str:
    """Follow symlinks and ``exec .../nvcc`` wrapper scripts to the toolkit's own nvcc."""
    real = os.path.realpath(path)
    if depth > 8:
        return real
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return real
    if not head.startswith(b"#!"):
        return real  # a binary: the real compiler
    match = _EXEC.search(head.decode("utf-8", "replace"))
    return _real_nvcc(match.group(1), depth + 1) if match else real


def find_cuda_home() -> tuple[str | None, str]:
    """Locate the CUDA toolkit root, returning ``(root or None, how it was found / why not)``.

    Order: ``$CUDA_HOME`` / ``$CUDA_PATH`` when they hold ``bin/nvcc``; the ``nvcc`` on ``PATH``,
    followed through symlinks and wrapper scripts that ``exec`` the real one (torch guesses the
    root from the wrapper's own folder, which is wrong for such wrappers); ``/usr/local/cuda``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if os.path.isfile(os.path.join(root, "bin", "nvcc")):
                return root, f"${var}"
            return None, f"${var}={root} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = _real_nvcc(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root, f"nvcc on PATH ({nvcc} -> {real})"
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no CUDA toolkit found (no nvcc on PATH, $CUDA_HOME unset, no /usr/local/cuda)"


def _cpp_extension(cuda_home: str | None = None):
    """Import ``torch.utils.cpp_extension`` with the right CUDA_HOME and without its log noise."""
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "No CUDA runtime is found" is expected on build machines
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home  # it was read once, at import
    return cpp_extension


def _check_tools(kind: str) -> str | None:
    """Why a ``kind`` build cannot start, or None; puts pip's ninja on PATH when it is off it."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; set $CXX)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # the pip package: its binary sits in ninja.BIN_DIR
        except ImportError:
            return "ninja is not installed (pip install ninja)"
        # an un-activated virtualenv has that folder off PATH, where torch looks for ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    if kind == "cuda" and torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return None


def _flags(kind: str) -> dict:
    # -fopenmp: at::parallel_for is inlined from ATen's header; without the flag it runs on one
    # thread inside an extension.
    omp = [] if sys.platform == "darwin" else ["-fopenmp"]
    flags = {
        "extra_cflags": ["-O3", *omp],
        "extra_ldflags": list(omp),
        "extra_include_paths": [str(sources_root())],
    }
    if kind == "cuda":
        flags["extra_cuda_cflags"] = ["-O3", "--expt-relaxed-constexpr"]
    return flags


def _fingerprint(kind: str, flags: dict) -> str:
    """Hash of everything a build depends on: every source file, the flags, torch and Python."""
    h = hashlib.sha256()
    h.update(f"{kind} {torch.__version__} {torch.version.cuda} {sys.version} {flags}".encode())
    for path in sorted(sources_root().rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def _build(kind: str) -> tuple[bool, str]:
    src = sources_root()
    if kind == "cpu":
        sources = [src / "ms_deform_attn.cpp", src / "cpu" / "ms_deform_attn_cpu.cpp"]
    else:
        ok, reason = load("cpu")  # the CPU extension defines the op schema
        if not ok:
            return False, f"the CPU extension, which defines the op schema, failed: {reason}"
        sources = [src / "cuda" / "ms_deform_attn_cuda.cu"]
    name = f"mrdetr_ms_deform_attn_{kind}"
    flags = _flags(kind)
    folder = build_directory(kind)
    library, stamp = folder / f"{name}.so", folder / f"{name}.sha256"
    fingerprint = _fingerprint(kind, flags)
    # A finished build of these exact sources loads without compiler, ninja or toolkit (runtime
    # images pre-built with `python -m mrdetr.ops build`); the stamp is written only after a
    # successful build, so a half-written library is never picked up here.
    if library.is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        try:
            torch.ops.load_library(str(library))
        except Exception:  # noqa: BLE001  a damaged library: remove it so ninja rebuilds it
            library.unlink(missing_ok=True)
        else:
            _after_load(kind)
            return True, f"loaded from the build cache {library}"
    missing = _check_tools(kind)
    cuda_home, how = find_cuda_home() if kind == "cuda" else (None, "")
    if kind == "cuda" and cuda_home is None:
        missing = missing or how
    if missing:
        return False, missing
    cpp_extension = _cpp_extension(cuda_home)
    stamp.unlink(missing_ok=True)  # no process trusts the library while it is rebuilt
    try:
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            build_directory=str(folder),
            is_python_module=False,
            verbose=os.environ.get("MRDETR_VERBOSE_BUILD", "") not in ("", "0"),
            **flags,
        )
    except Exception as exc:  # noqa: BLE001  a compiler error must never break the caller
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = " | ".join(lines[-4:])[-600:] if lines else type(exc).__name__
        return False, f"building {name} failed: {detail}"
    tmp = stamp.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(fingerprint)
    tmp.replace(stamp)
    _after_load(kind)
    return True, f"built in {folder}"


def _after_load(kind: str) -> None:
    if kind == "cpu":
        from . import _library

        _library.register()


def load(kind: str) -> tuple[bool, str]:
    """Build (first time) and load the ``kind`` extension; return ``(ok, reason)``. Cached."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    with _lock:
        if kind not in _results:
            _results[kind] = _build(kind)
        return _results[kind]


def status(kind: str) -> tuple[bool, str] | None:
    """The cached ``(ok, reason)`` of ``kind``'s build, or None when it was never tried."""
    return _results.get(kind)
