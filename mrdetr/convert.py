"""Convert checkpoints of the public Mr. DETR reference implementation (detrex-style keys).

One reference decoder layer holds the three routes: the plain call is the primary route,
``sep=True`` Route-1 (own FFN linears ``linear_sep``), ``o2m=True`` Route-3 (instruction tokens
and ``norm_o2m``). The converted state dict loads into
``MultiRouteDecoderLayer(routes=routes.mr_detr())`` (or a ``MultiRouteDecoder`` of such layers)
and gives the same outputs route for route.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

__all__ = ["convert_reference_layer", "convert_reference_decoder", "REFERENCE_LAYER_KEYS"]

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
            see :data:`REFERENCE_LAYER_KEYS`; layout in ``DESIGN.md``).
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
            converted = convert_reference_layer(
                layers[i], ffn_route=ffn_route, instruct_route=instruct_route
            )
        except ValueError as err:
            raise ValueError(f"layer {prefix}{i}: {err}") from None
        out.update({f"{out_prefix}{i}.{k}": v for k, v in converted.items()})
    return out
