"""Test helpers for the matchers' one-thread rule (``mrdetr.matching.base.single_thread``)."""

import contextlib

import torch


def record_threads(monkeypatch, module, name: str) -> list[int]:
    """Patch ``module.<name>`` to record ``torch.get_num_threads()`` at every call; the list
    fills as the patched function runs (the original still does the work)."""
    seen: list[int] = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run the block with ``n`` intra-op threads, restoring the caller's count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
