"""Convert decoder checkpoints of other codebases to and from ``MultiRouteDecoderLayer`` keys.

Two sources:

- The public Mr. DETR reference implementation (detrex-style keys). One reference decoder layer
  holds the three routes: the plain call is the primary route, ``sep=True`` Route-1 (own FFN
  linears ``linear_sep``), ``o2m=True`` Route-3 (instruction tokens and ``norm_o2m``). The
  converted state dict loads into ``MultiRouteDecoderLayer(routes=routes.mr_detr())`` (or a
  ``MultiRouteDecoder`` of such layers) and gives the same outputs route for route.
- The original Deformable-DETR decoder (``DeformableTransformerDecoderLayer``), both ways. Its
  layer names its LayerNorms by position in the constructor, not in the computation: its
  ``norm2`` follows self-attention and its ``norm1`` cross-attention, the other way round from
  ``MultiRouteDecoderLayer``. A plain key copy loads with ``strict=True`` and silently swaps
  trained LayerNorms; :func:`convert_deformable_detr_layer` maps them by role.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor

__all__ = [
    "DEFORMABLE_DETR_LAYER_KEYS",
    "REFERENCE_LAYER_KEYS",
    "convert_deformable_detr_decoder",
    "convert_deformable_detr_layer",
    "convert_reference_decoder",
    "convert_reference_layer",
    "to_deformable_detr_decoder",
    "to_deformable_detr_layer",
]

_WB = ("weight", "bias")
_FIXED = {
    "attentions.0.attn.in_proj_weight": "self_attn.in_proj_weight",
    "attentions.0.attn.in_proj_bias": "self_attn.in_proj_bias",
    "attentions.0.attn.out_proj.weight": "self_attn.out_proj.weight",
    "attentions.0.attn.out_proj.bias": "self_attn.out_proj.bias",
    "attentions.0.instruction_o2m.weight": "aux.{instruct}.self_attn.tokens",
    "attentions.0.instruction_o2m_pos.weight": "aux.{instruct}.self_attn.tokens_pos",
    **{f"attentions.0.norm_o2o.{p}": f"norm1.{p}" for p in _WB},
    **{f"attentions.0.norm_o2m.{p}": f"aux.{{instruct}}.norm1.{p}" for p in _WB},
    **{
        f"attentions.1.{m}.{p}": f"cross_attn.{m}.{p}"
        for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for p in _WB
    },
    **{f"ffns.0.layers.0.linear.linear.{p}": f"ffn.linear1.{p}" for p in _WB},
    **{f"ffns.0.layers.0.linear.linear_sep.{p}": f"aux.{{ffn}}.ffn.linear1.{p}" for p in _WB},
    **{f"ffns.0.layers.1.linear.{p}": f"ffn.linear2.{p}" for p in _WB},
    **{f"ffns.0.layers.1.linear_sep.{p}": f"aux.{{ffn}}.ffn.linear2.{p}" for p in _WB},
    **{f"norms.0.{p}": f"norm2.{p}" for p in _WB},
    **{f"norms.1.{p}": f"norm3.{p}" for p in _WB},
}
REFERENCE_LAYER_KEYS: tuple[str, ...] = tuple(_FIXED)
"""Every key of one reference decoder layer (the converter requires exactly these)."""


def convert_reference_layer(
    state_dict: Mapping[str, Tensor],
    *,
    ffn_route: str = "aux_ffn",
    instruct_route: str = "aux_instruct",
) -> dict[str, Tensor]:
    """Map one reference decoder layer's state dict to ``MultiRouteDecoderLayer`` keys.

    Args:
        state_dict: the layer's tensors, keys relative to the layer (``attentions.0.attn...``,
            see :data:`REFERENCE_LAYER_KEYS`; layout in ``docs/routes.md``).
        ffn_route: name of the route with its own FFN (Route-1) in the target route set.
        instruct_route: name of the route with instruction tokens (Route-3).

    Returns:
        A new dict with the same tensors (not copied) under the target keys; it loads with
        ``strict=True`` into ``MultiRouteDecoderLayer(routes=routes.mr_detr(n))``.

    Raises:
        ValueError: unknown or missing keys, listed.
    """
    unknown = sorted(set(state_dict) - set(_FIXED))
    missing = sorted(set(_FIXED) - set(state_dict))
    if unknown or missing:
        raise ValueError(
            "state_dict must hold exactly the reference layer keys; "
            f"unknown: {unknown or 'none'}; missing: {missing or 'none'}"
        )
    names = {"ffn": ffn_route, "instruct": instruct_route}
    return {_FIXED[k].format(**names): v for k, v in state_dict.items()}


def convert_reference_decoder(
    state_dict: Mapping[str, Tensor],
    prefix: str = "transformer.decoder.layers.",
    *,
    out_prefix: str = "layers.",
    ffn_route: str = "aux_ffn",
    instruct_route: str = "aux_instruct",
) -> dict[str, Tensor]:
    """Convert every decoder layer of a whole reference checkpoint.

    Keys ``f"{prefix}{i}.{layer key}"`` become ``f"{out_prefix}{i}.{converted key}"``, the keys
    of a ``MultiRouteDecoder``; keys outside ``prefix`` (backbone, encoder, heads) are left out.

    Args:
        state_dict: a full model state dict (e.g. ``torch.load(path)["model"]``).
        prefix: where the reference's decoder layers live.
        out_prefix: prefix of the returned keys.
        ffn_route, instruct_route: as :func:`convert_reference_layer`.

    Returns:
        dict for ``MultiRouteDecoder.load_state_dict`` (with the default ``out_prefix``).

    Raises:
        ValueError: no key starts with ``prefix``, or a layer's keys are incomplete/unknown.
    """
    return _convert_layers(
        state_dict,
        prefix,
        out_prefix,
        lambda sd: convert_reference_layer(sd, ffn_route=ffn_route, instruct_route=instruct_route),
    )


def _convert_layers(
    state_dict: Mapping[str, Tensor],
    prefix: str,
    out_prefix: str,
    convert_one: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """Apply ``convert_one`` to every layer ``f"{prefix}{i}."``; keys outside are left out."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    layers: dict[int, dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        m = pattern.fullmatch(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    if not layers:
        raise ValueError(f"no key of state_dict starts with prefix={prefix!r}<layer index>.")
    out: dict[str, Tensor] = {}
    for i in sorted(layers):
        try:
            converted = convert_one(layers[i])
        except ValueError as err:
            raise ValueError(f"layer {prefix}{i}: {err}") from None
        out.update({f"{out_prefix}{i}.{k}": v for k, v in converted.items()})
    return out


# Deformable-DETR layer key -> MultiRouteDecoderLayer key (primary route). The LayerNorms are
# matched by role: theirs norm2 (after self-attention) is our norm1, theirs norm1 (after
# cross-attention) our norm2.
_DEFORMABLE_DETR = {
    "self_attn.in_proj_weight": "self_attn.in_proj_weight",
    "self_attn.in_proj_bias": "self_attn.in_proj_bias",
    **{f"self_attn.out_proj.{p}": f"self_attn.out_proj.{p}" for p in _WB},
    **{f"norm2.{p}": f"norm1.{p}" for p in _WB},
    **{
        f"cross_attn.{m}.{p}": f"cross_attn.{m}.{p}"
        for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for p in _WB
    },
    **{f"norm1.{p}": f"norm2.{p}" for p in _WB},
    **{f"linear1.{p}": f"ffn.linear1.{p}" for p in _WB},
    **{f"linear2.{p}": f"ffn.linear2.{p}" for p in _WB},
    **{f"norm3.{p}": f"norm3.{p}" for p in _WB},
}
_TO_DEFORMABLE_DETR = {ours: theirs for theirs, ours in _DEFORMABLE_DETR.items()}
DEFORMABLE_DETR_LAYER_KEYS: tuple[str, ...] = tuple(_DEFORMABLE_DETR)
"""Every key of one original ``DeformableTransformerDecoderLayer``."""


def _rename_exactly(
    state_dict: Mapping[str, Tensor], table: Mapping[str, str], what: str, hint: str = ""
) -> dict[str, Tensor]:
    unknown = sorted(set(state_dict) - set(table))
    missing = sorted(set(table) - set(state_dict))
    if unknown or missing:
        raise ValueError(
            f"state_dict must hold exactly the keys of {what}; unknown: {unknown or 'none'}; "
            f"missing: {missing or 'none'}{hint if unknown else ''}"
        )
    return {table[k]: v for k, v in state_dict.items()}


def convert_deformable_detr_layer(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map one original Deformable-DETR decoder layer's state dict to ``MultiRouteDecoderLayer``.

    Args:
        state_dict: the layer's tensors, keys relative to the layer (``self_attn.in_proj_weight``,
            ``norm1.weight``, ``linear1.bias``, ...; see :data:`DEFORMABLE_DETR_LAYER_KEYS`).

    Returns:
        A new dict with the same tensors (not copied) under the primary route's keys: it loads
        with ``strict=True`` into ``MultiRouteDecoderLayer(routes=routes.baseline())`` (same
        sizes, ``activation``) and gives the original layer's outputs. Into a layer with
        auxiliary routes, load with ``strict=False``: only ``aux.`` keys are then missing.

    Raises:
        ValueError: unknown or missing keys, listed.
    """
    return _rename_exactly(state_dict, _DEFORMABLE_DETR, "a DeformableTransformerDecoderLayer")


def to_deformable_detr_layer(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`convert_deformable_detr_layer`: ``MultiRouteDecoderLayer`` (primary
    route only) keys to original Deformable-DETR layer keys (LayerNorms mapped by role).

    Raises:
        ValueError: unknown or missing keys, listed (``aux.`` keys: call ``strip_auxiliary()``
            first).
    """
    hint = " (auxiliary routes: call strip_auxiliary() first)"
    if not any(k.startswith("aux.") for k in state_dict):
        hint = ""
    return _rename_exactly(
        state_dict, _TO_DEFORMABLE_DETR, "a single-route MultiRouteDecoderLayer", hint
    )


def convert_deformable_detr_decoder(
    state_dict: Mapping[str, Tensor],
    prefix: str = "transformer.decoder.layers.",
    *,
    out_prefix: str = "layers.",
) -> dict[str, Tensor]:
    """Convert every decoder layer of an original Deformable-DETR checkpoint.

    Keys ``f"{prefix}{i}.{layer key}"`` become ``f"{out_prefix}{i}.{converted key}"`` (the keys
    of a ``MultiRouteDecoder``); everything else (backbone, encoder, heads) is left out.

    Args:
        state_dict: e.g. ``torch.load(path)["model"]`` of a Deformable-DETR checkpoint.
        prefix: where the decoder layers live.
        out_prefix: prefix of the returned keys.

    Raises:
        ValueError: no key starts with ``prefix``, or a layer's keys are incomplete/unknown.
    """
    return _convert_layers(state_dict, prefix, out_prefix, convert_deformable_detr_layer)


def to_deformable_detr_decoder(
    state_dict: Mapping[str, Tensor],
    prefix: str = "layers.",
    *,
    out_prefix: str = "transformer.decoder.layers.",
) -> dict[str, Tensor]:
    """Inverse of :func:`convert_deformable_detr_decoder`: a single-route ``MultiRouteDecoder``'s
    layers to original Deformable-DETR keys under ``out_prefix``."""
    return _convert_layers(state_dict, prefix, out_prefix, to_deformable_detr_layer)
