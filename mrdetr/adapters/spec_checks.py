"""The dry run of a :class:`~mrdetr.adapters.DecoderSpec`: every field checked against the decoder.

At :func:`~mrdetr.adapters.wrap` time (:func:`check_spec`), on the module structure alone:

- ``decoder``, ``layers``, ``self_attn``, ``self_attn_norm``, ``ffn``, ``final_norm``: the paths
  exist and hold modules (``layers`` a non-empty sequence of them);
- a tiny forward of the first layer's parts on a probe ``[3, 2, C]`` tensor, in ``eval()`` and
  ``no_grad`` with a private generator (no dropout, no global RNG draw, no graph): the
  self-attention is called as the packed pass calls it (``nn.MultiheadAttention``'s
  convention) and must return ``(out, ...)`` shaped like its query; which axis it mixes
  positions along decides ``batch_first``; the norms and the FFN must keep the width ``C``;
- ``query_inputs``: every name an argument of the decoder's ``forward``, axes non-negative
  ints, the first entry's axis the layers' query axis (it is the queries, ``[B, Q, C]`` or
  ``[Q, B, C]``); ``output_query_dim`` a non-negative int or None.

On every training call (:func:`check_query_inputs`, :func:`check_output`): every query input
has the same number of queries along its axis, and the decoder's output holds the packed
queries along ``output_query_dim``.

Each mistake raises ``ValueError`` naming the field (``spec.<field>``), what was expected and
what was found.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["check_output", "check_query_inputs", "check_spec"]


@contextlib.contextmanager
def _probing(module: nn.Module) -> Iterator[None]:
    """``module`` in ``eval()`` under ``no_grad`` for the block; every training flag restored."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _width(layer) -> int | None:
    """The layers' channel width ``C`` as the host's modules declare it, else None."""
    shape = getattr(layer.self_attn_norm, "normalized_shape", None)
    for c in (getattr(layer.self_attn, "embed_dim", None), shape[-1] if shape else None,
              getattr(layer.ffn[0], "in_features", None)):  # fmt: skip
        if isinstance(c, int):
            return c
    return None


def _probe_attention(spec, attn: nn.Module, x: Tensor) -> None:
    """Call ``attn`` as the packed pass does; its mixing axis must be the spec's query axis."""
    where = f"layers[0].{spec.self_attn} ({type(attn).__name__})"

    def run(t: Tensor) -> Tensor:
        try:
            out = attn(t, t, t, key_padding_mask=None, need_weights=False, attn_mask=None)
        except Exception as e:
            raise ValueError(
                f"spec.self_attn: expected a module called like nn.MultiheadAttention(query, "
                f"key, value, key_padding_mask=, need_weights=, attn_mask=) -> (out, weights); "
                f"calling {where} on a {tuple(t.shape)} probe raised {e!r}"
            ) from e
        y = out[0] if isinstance(out, (tuple, list)) else None
        if not isinstance(y, Tensor) or y.shape != t.shape:
            found = type(out).__name__ if y is None else f"out of shape {tuple(y.shape)}"
            raise ValueError(
                f"spec.self_attn: expected {where} to return (out {tuple(t.shape)}, weights) "
                f"like nn.MultiheadAttention, found {found}"
            )
        return y

    base, moved = x.clone(), x.clone()
    moved[0, 0] += 1.0
    delta = (run(moved) - run(base)).abs()
    along0, along1 = bool(delta[1:, 0].any()), bool(delta[0, 1:].any())
    if along0 != along1:  # mixes along exactly one axis: that is the query axis
        found_bf = along1
        if found_bf != spec.batch_first:
            layout = "[B, Q, C]" if found_bf else "[Q, B, C]"
            raise ValueError(
                f"spec.batch_first: expected {found_bf} ({where} mixes positions along axis "
                f"{int(found_bf)} of its inputs: they are {layout}), found {spec.batch_first}"
            )


def _probe_width(field: str, fn, x: Tensor, c: int, where: str) -> None:
    try:
        y = fn(x)
    except Exception as e:
        raise ValueError(
            f"spec.{field}: expected {where} to take the layers' [.., C={c}] hidden states; "
            f"a {tuple(x.shape)} probe raised {e!r}"
        ) from e
    if not isinstance(y, Tensor) or y.shape[-1] != c:
        found = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"spec.{field}: expected {where} to return [.., C={c}], found {found}")


def _check_inputs(spec, decoder: nn.Module) -> None:
    dims = spec.query_inputs
    if not dims:
        raise ValueError("spec.query_inputs: expected at least one forward argument, found none")
    params = inspect.signature(type(decoder).forward).parameters
    names = [n for n in params if n != "self"]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name, dim in dims.items():
        if not open_ended and name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(
                f"spec.query_inputs: expected argument names of {type(decoder).__name__}."
                f"forward {names}, found {name!r}{hint}"
            )
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ValueError(
                f"spec.query_inputs[{name!r}]: expected a non-negative int axis, found {dim!r}"
            )
    first, qd = next(iter(dims)), 1 if spec.batch_first else 0
    if dims[first] != qd:
        layout = "[B, Q, C]" if spec.batch_first else "[Q, B, C]"
        raise ValueError(
            f"spec.query_inputs[{first!r}]: expected axis {qd} (the first entry is the queries, "
            f"{layout} with batch_first={spec.batch_first}), found {dims[first]}"
        )
    out = spec.output_query_dim
    if out is not None and (isinstance(out, bool) or not isinstance(out, int) or out < 0):
        raise ValueError(f"spec.output_query_dim: expected None or an int >= 0, found {out!r}")


def check_spec(spec, decoder: nn.Module, layers: Sequence, final_norm: nn.Module | None) -> None:
    """The wrap-time dry run (see the module docstring).

    Args:
        spec: the :class:`~mrdetr.adapters.DecoderSpec`.
        decoder: the decoder it points at.
        layers: its :class:`~mrdetr.adapters.route_modules.LayerModules`, paths resolved.
        final_norm: the module ``spec.final_norm`` resolved to (None: no final norm).
    """
    _check_inputs(spec, decoder)
    parts = {
        "self_attn": [h.self_attn for h in layers],
        "self_attn_norm": [h.self_attn_norm for h in layers],
        "ffn": [m for h in layers for m in h.ffn],
        "final_norm": [final_norm] if final_norm is not None else [],
    }
    for field, mods in parts.items():
        bad = [type(m).__name__ for m in mods if not isinstance(m, nn.Module)]
        if bad:
            raise ValueError(f"spec.{field}: expected nn.Module, found {bad[0]}")
    bad = [type(h.layer).__name__ for h in layers if not isinstance(h.layer, nn.Module)]
    if bad:
        raise ValueError(f"spec.layers: expected a sequence of nn.Module, found {bad[0]}")
    first, c = layers[0], _width(layers[0])
    if c is None:  # nothing declares the width: structural checks only
        return
    p = next(first.layer.parameters(), None)
    kw = {"dtype": p.dtype, "device": p.device} if p is not None and p.is_floating_point() else {}
    x = torch.randn(3, 2, c, generator=torch.Generator().manual_seed(0)).to(**kw)
    with contextlib.ExitStack() as stack:
        for m in (first.layer, final_norm):
            if m is not None:
                stack.enter_context(_probing(m))
        _probe_attention(spec, first.self_attn, x)
        _probe_width(
            "self_attn_norm", first.self_attn_norm, x, c, f"layers[0].{spec.self_attn_norm}"
        )

        def ffn(t: Tensor) -> Tensor:  # the linears in order (the activation keeps shapes)
            for m in first.ffn:
                t = m(t)
            return t

        _probe_width("ffn", ffn, x, c, f"layers[0].{spec.ffn}")
        if final_norm is not None:
            name = "norm" if spec.final_norm == "auto" else spec.final_norm
            _probe_width("final_norm", final_norm, x, c, f"decoder.{name}")


def check_query_inputs(spec, arguments: dict) -> int:
    """Every given query input's size along its axis; returns the number of queries ``Q``."""
    dims = spec.query_inputs
    first = next(iter(dims))
    sizes = {}
    for name, dim in dims.items():
        t = arguments.get(name)
        if t is None:
            if name == first:
                raise ValueError(
                    f"spec.query_inputs: expected the queries in forward argument {first!r} "
                    "(the first entry), found none given"
                )
            continue
        if not isinstance(t, Tensor) or t.dim() <= dim:
            found = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"spec.query_inputs[{name!r}]: expected a tensor with an axis {dim}, found {found}"
            )
        sizes[name] = t.shape[dim]
    q = sizes[first]
    for name, n in sizes.items():
        if n != q:
            raise ValueError(
                f"spec.query_inputs[{name!r}]: expected {q} queries along axis {dims[name]} "
                f"(as {first!r} has along axis {dims[first]}), found {n} "
                f"(shape {tuple(arguments[name].shape)})"
            )
    return q


def check_output(spec, tensors: list[Tensor], dim: int, length: int) -> None:
    """The decoder's returned ``tensors`` must hold the ``length`` packed queries on ``dim``."""
    if tensors and not any(t.dim() > dim and t.shape[dim] == length for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        axes = sorted({i for t in tensors for i, s in enumerate(t.shape) if s == length})
        hint = f" (the packed queries are on axis {axes[0]})" if axes else ""
        raise ValueError(
            f"spec.output_query_dim: expected the decoder's output to have the {length} packed "
            f"queries (routes x queries) on axis {dim}, found shapes {shapes}{hint}"
        )
