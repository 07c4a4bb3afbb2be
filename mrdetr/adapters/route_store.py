"""Where a wrapped decoder's training call leaves its :class:`RouteOutputs`: a per-thread store
keyed by the decoder (weakly), so two wrapped models, or two replicas of one as
``nn.DataParallel`` runs them, training in two threads at once each see their own outputs, and
nothing of a pass is stored on the modules or on the (shared) integration."""

from __future__ import annotations

import threading
import weakref

from torch import nn

from .integration import RouteOutputs

__all__ = ["drop", "peek", "put", "take"]


class _PassStore(threading.local):
    """Per thread: wrapped decoder -> :class:`RouteOutputs` of its last training call."""

    def __init__(self) -> None:
        self.outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_STORE = _PassStore()


def put(decoder: nn.Module, outputs: RouteOutputs) -> None:
    """Keep ``outputs`` as ``decoder``'s last training call in this thread."""
    _STORE.outputs[decoder] = outputs


def peek(decoder: nn.Module) -> RouteOutputs | None:
    """``decoder``'s last training call's outputs in this thread, left in place; or None."""
    return _STORE.outputs.get(decoder)


def take(decoder: nn.Module) -> RouteOutputs | None:
    """``decoder``'s last training call's outputs in this thread, removed; or None."""
    return _STORE.outputs.pop(decoder, None)


def drop(decoder: nn.Module) -> None:
    """Forget ``decoder``'s outputs in this thread (after :func:`~mrdetr.adapters.unwrap`)."""
    _STORE.outputs.pop(decoder, None)
