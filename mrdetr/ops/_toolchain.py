"""The build toolchain: C++ compiler, ninja, CUDA toolkit and the CPU's instruction set.

Everything that looks at (or changes) the process environment for a build lives here; the
fingerprinted build cache (``_build.py``) asks this module for tools and flags and never touches
``os.environ`` itself.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import sys

import torch

__all__ = ["find_cuda_home", "missing_tools", "cpp_extension", "cpu_isa", "compile_flags"]

ISA_ENV_VAR = "MRDETR_CPU_ISA"
_EXEC = re.compile(r"""^\s*exec\s+["']?(/[^\s"']+)""", re.MULTILINE)
# x86-64 extensions the CPU kernel benefits from (256-bit FMA vectors, fp16 conversions). All
# three must be present, as /proc/cpuinfo lists only what both the CPU and the kernel enable.
_X86_ISA = {"avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c"}


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


def _ninja_dir() -> str | None:
    """The folder holding a ninja binary: PATH's, else pip's ``ninja`` package, else None."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    try:
        import ninja  # the pip package: its binary sits in ninja.BIN_DIR
    except ImportError:
        return None
    return ninja.BIN_DIR


def missing_tools(kind: str) -> str | None:
    """Why a ``kind`` ("cpu"/"cuda") build cannot start, or None. Reads, changes nothing."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; set $CXX)"
    if _ninja_dir() is None:
        return "ninja is not installed (pip install ninja)"
    if kind == "cuda":
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        root, how = find_cuda_home()
        if root is None:
            return how
    return None


def cpp_extension(kind: str):
    """``torch.utils.cpp_extension``, set up for a ``kind`` build.

    Puts pip's ninja on ``PATH`` when an un-activated virtualenv left it off (torch looks there)
    and points torch at the CUDA toolkit :func:`find_cuda_home` found (torch reads ``CUDA_HOME``
    once, at import, and guesses wrong behind wrapper scripts). Call :func:`missing_tools` first.
    """
    ninja_dir = _ninja_dir()
    if ninja_dir and shutil.which("ninja") is None:
        os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
    cuda_home = find_cuda_home()[0] if kind == "cuda" else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "No CUDA runtime is found" is expected on build machines
    try:
        from torch.utils import cpp_extension as ext
    finally:
        logger.setLevel(level)
    if cuda_home:
        ext.CUDA_HOME = cuda_home  # it was read once, at import
    return ext


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa() -> tuple[str, list[str]]:
    """``(tag, flags)`` of the instruction set the CPU kernel may use on this machine.

    ``("avx2", ["-mavx2", "-mfma", "-mf16c"])`` on an x86-64 Linux CPU that has all three
    extensions, else ``("generic", [])``; ``MRDETR_CPU_ISA=generic`` forces the generic build.
    The tag names the build folder, so a cache shared by different machines keeps one library
    per instruction set instead of loading one built for another CPU.
    """
    forced = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if forced not in ("", "auto", "generic"):
        raise ValueError(f"{ISA_ENV_VAR} must be 'auto' or 'generic', got {forced!r}")
    if forced == "generic" or sys.platform != "linux":
        return "generic", []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic", []
    if not set(_X86_ISA) <= _cpu_flags():
        return "generic", []
    return "avx2", list(_X86_ISA.values())


def compile_flags(kind: str, isa_flags: list[str], include: str) -> dict:
    """Keyword arguments of ``cpp_extension.load`` for a ``kind`` build."""
    # -fopenmp: at::parallel_for is inlined from ATen's header; without the flag it runs on one
    # thread inside an extension.
    omp = [] if sys.platform == "darwin" else ["-fopenmp"]
    flags = {
        "extra_cflags": ["-O3", *omp, *isa_flags],
        "extra_ldflags": list(omp),
        "extra_include_paths": [include],
    }
    if kind == "cuda":
        flags["extra_cuda_cflags"] = ["-O3", "--expt-relaxed-constexpr"]
    return flags
