"""Fingerprinted build cache of the C++/CUDA kernels, with a reason for every failure.

Nothing here runs at ``import mrdetr``: the CPU library is built on the first CPU call (or by
:func:`mrdetr.ops.build`), the CUDA one on the first CUDA call. A library lives in
``$MRDETR_BUILD_DIR/<torch, CUDA, Python versions>/<kind>-<instruction set>/``, next to a stamp
holding the fingerprint of what it was built from (sources, flags, versions) and the size and
SHA-256 of the library itself. A later process loads the library only when both match, so a
stale, truncated or overwritten library is rebuilt instead of loaded (a truncated library
kills the process with SIGBUS inside ``dlopen``). Concurrent builds of one folder are serialised
by a POSIX lock (``_folder_lock``), which also makes the lock file torch leaves behind after a
killed build recognisably stale. Tools and flags come from ``_toolchain.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

import torch

from . import _toolchain

__all__ = ["load", "status", "probe", "sources_root", "build_directory"]

_lock = threading.RLock()
_results: dict[str, tuple[bool, str]] = {}


def sources_root() -> Path:
    """The ``ms_deform_attn`` sources: ``csrc/`` of a checkout, or ``mrdetr/_csrc`` in a wheel."""
    here = Path(__file__).resolve().parent.parent  # mrdetr/
    for root in (here.parent / "csrc", here / "_csrc"):
        if (root / "ms_deform_attn" / "ms_deform_attn.h").is_file():
            return root / "ms_deform_attn"
    raise FileNotFoundError(
        f"mrdetr's C++ sources are missing (looked in {here.parent}/csrc and {here}/_csrc)"
    )


def build_directory(kind: str, isa: str = "generic") -> Path:
    """Build folder of the ``kind`` ("cpu"/"cuda") library for instruction set ``isa``.

    Only computes the path: the folder is created by the build that needs it.
    """
    base = os.environ.get("MRDETR_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mrdetr"
    )
    cuda = torch.version.cuda or "cpu"
    py = f"{sys.version_info[0]}{sys.version_info[1]}"
    tag = f"torch{torch.__version__.split('+')[0]}-cu{cuda}-py{py}"
    return Path(base) / tag / (kind if kind == "cuda" else f"{kind}-{isa}")


def _variants(kind: str) -> list[tuple[str, list[str]]]:
    """``(isa tag, flags)`` to try in order: this CPU's instruction set, then generic."""
    if kind == "cuda":
        return [("generic", [])]
    tag, flags = _toolchain.cpu_isa()
    return [(tag, flags)] + ([("generic", [])] if flags else [])


def _sources(kind: str) -> list[Path]:
    src = sources_root()
    if kind == "cpu":
        return [src / "cpu" / "ms_deform_attn_cpu.cpp"]
    return [src / "cuda" / "ms_deform_attn_cuda.cu"]


def _fingerprint(kind: str, flags: dict) -> str:
    """Hash of everything a build depends on: every source file, the flags, torch and Python."""
    h = hashlib.sha256()
    h.update(f"{kind} {torch.__version__} {torch.version.cuda} {sys.version} {flags}".encode())
    for path in sorted(sources_root().rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def _read_stamp(stamp: Path) -> dict:
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _verified(library: Path, stamp: Path, fingerprint: str) -> bool:
    """The stamp matches these sources and the library's bytes are the ones that were built."""
    data = _read_stamp(stamp)
    if data.get("fingerprint") != fingerprint or not library.is_file():
        return False
    try:
        if library.stat().st_size != data.get("size"):
            return False  # cheap first: a truncated copy has the wrong size
        return _file_digest(library) == (data.get("size"), data.get("sha256"))
    except OSError:
        return False


def _write_stamp(library: Path, stamp: Path, fingerprint: str) -> None:
    size, sha = _file_digest(library)
    tmp = stamp.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "size": size, "sha256": sha}))
    tmp.replace(stamp)  # atomic: readers see the old stamp or the new one


def _paths(kind: str, isa: str) -> tuple[str, Path, Path, Path]:
    # one name per instruction set: torch renames a second build of one name in a process
    name = "mrdetr_ms_deform_attn_cuda" if kind == "cuda" else f"mrdetr_ms_deform_attn_{kind}_{isa}"
    folder = build_directory(kind, isa)
    return name, folder, folder / f"{name}.so", folder / f"{name}.stamp.json"


def _compile(kind: str, isa: str, isa_flags: list[str]) -> tuple[bool, str]:
    name, folder, library, stamp = _paths(kind, isa)
    flags = _toolchain.compile_flags(kind, isa_flags, str(sources_root()))
    fingerprint = _fingerprint(kind, flags)
    # A finished build of these exact sources loads without compiler, ninja or toolkit (runtime
    # images pre-built with `python -m mrdetr.ops build`).
    if _verified(library, stamp, fingerprint):
        try:
            torch.ops.load_library(str(library))
        except Exception:  # noqa: BLE001  e.g. a library of another glibc: rebuild it below
            pass
        else:
            return True, f"loaded from the build cache {library}"
    missing = _toolchain.missing_tools(kind)
    if missing:
        return False, missing
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _folder_lock(folder):
            return _compile_locked(kind, isa, name, folder, library, stamp, flags, fingerprint)
    except OSError as exc:
        return False, f"the build directory {folder} is not usable ({exc}); set $MRDETR_BUILD_DIR"


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Hold an exclusive lock on ``folder`` (POSIX ``flock``) while checking and building.

    Without it, a process that finds no verified library could delete the one another process
    is linking or loading.
    """
    try:
        import fcntl
    except ImportError:  # Windows: torch's own lock file still serialises the compiler
        yield
        return
    with open(folder / "mrdetr.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_baton(folder: Path) -> None:
    """Delete torch's ``lock`` file in ``folder``: under our lock, it can only be stale.

    ``torch.utils.cpp_extension.load`` creates ``<build dir>/lock`` for the duration of a build
    and waits, with no output and no timeout, for as long as the file exists. A build killed by
    SIGKILL or SIGTERM leaves the file behind, and every later build would wait forever. Every
    mrdetr build of ``folder`` runs while holding ``_folder_lock`` (``flock``, which the kernel
    releases when its owner dies), so once we hold it no other process is building here: a
    ``lock`` file is the remnant of a killed build. (Without ``fcntl``, on Windows, there is no
    such lock and the file is left to torch.)
    """
    try:
        import fcntl  # noqa: F401  only where _folder_lock really locks
    except ImportError:
        return
    (folder / "lock").unlink(missing_ok=True)


def _compile_locked(kind, isa, name, folder, library, stamp, flags, fingerprint):
    if _verified(library, stamp, fingerprint):  # another process finished it meanwhile
        try:
            torch.ops.load_library(str(library))
        except Exception:  # noqa: BLE001  verified but not loadable here: rebuild it
            pass
        else:
            return True, f"loaded from the build cache {library}"
    stamp.unlink(missing_ok=True)  # no process trusts the library while it is rebuilt
    library.unlink(missing_ok=True)  # ninja would keep a damaged one whose date is newer
    _remove_stale_baton(folder)
    ext = _toolchain.cpp_extension(kind)
    try:
        ext.load(
            name=name,
            sources=[str(s) for s in _sources(kind)],
            build_directory=str(folder),
            is_python_module=False,
            verbose=os.environ.get("MRDETR_VERBOSE_BUILD", "") not in ("", "0"),
            **flags,
        )
    except Exception as exc:  # noqa: BLE001  a compiler error must never break the caller
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = " | ".join(lines[-4:])[-600:] if lines else type(exc).__name__
        return False, f"building {name} ({isa}) failed: {detail}"
    _write_stamp(library, stamp, fingerprint)
    return True, f"built in {folder}"


def _build(kind: str) -> tuple[bool, str]:
    failures = []
    for isa, isa_flags in _variants(kind):
        ok, reason = _compile(kind, isa, isa_flags)
        if ok:
            if failures:
                reason += f" (the {failures[0][0]} build failed: {failures[0][1]})"
            return True, reason
        failures.append((isa, reason))
        if not reason.startswith("building"):
            break  # no tools or no folder: a generic build would fail the same way
    if len(failures) == 1:
        return False, failures[0][1]
    return False, f"{failures[0][1]} (the generic build failed too)"


def load(kind: str) -> tuple[bool, str]:
    """Build (first time) and load the ``kind`` library; return ``(ok, reason)``. Cached."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    with _lock:
        if kind not in _results:
            _results[kind] = _build(kind)
        return _results[kind]


def status(kind: str) -> tuple[bool, str] | None:
    """The cached ``(ok, reason)`` of ``kind``'s build in this process, or None if never tried."""
    return _results.get(kind)


def _writable(folder: Path) -> str | None:
    """Why ``folder`` cannot be created and written, or None."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:  # os.access would say yes to root even where the file system refuses
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as exc:
        return f"{probe} is not writable: {exc.strerror or exc}"
    return None


def probe(kind: str) -> tuple[bool, str, bool]:
    """``(available, reason, built)`` of the ``kind`` library, without building or loading it.

    ``built`` is True when it is loaded or a verified library sits in the cache.
    """
    if kind in _results:
        ok, reason = _results[kind]
        return ok, reason, ok
    try:
        variants = _variants(kind)
    except ValueError as exc:
        return False, str(exc), False
    for isa, isa_flags in variants:
        _, _, library, stamp = _paths(kind, isa)
        flags = _toolchain.compile_flags(kind, isa_flags, str(sources_root()))
        if _verified(library, stamp, _fingerprint(kind, flags)):
            return True, f"built ({library}); loads on first use", True
    missing = _toolchain.missing_tools(kind)
    if missing:
        return False, missing, False
    folder = build_directory(kind, variants[0][0])
    why = _writable(folder)
    if why:
        return False, f"the build directory {folder} is not usable ({why})", False
    now = "build(cuda=True)" if kind == "cuda" else "build()"
    return True, f"not built yet: builds on first use, or now with mrdetr.ops.{now}", False
