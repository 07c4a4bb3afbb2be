"""The differences between the HF transformers versions the adapters support, decided here once.

Supported and tested: transformers 4.57 and 5.x. Every difference that matters to the adapters
is recognised from the installed classes themselves (their attributes, ``forward`` signatures
and return values), never by comparing version strings:

============================  ===========================  ==================================
what                          4.57                         5.x
============================  ===========================  ==================================
decoder layer FFN             ``layer.fc1``, ``fc2``       ``layer.mlp`` (``.fc1``, ``.fc2``)
self-attention output linear  ``out_proj``                 ``o_proj``
decoder layer returns         ``(hidden_states, ...)``     ``hidden_states``
decoder query positions arg   ``position_embeddings``      ``object_queries_position_embeddings``
decoder ``return_dict``       argument (tuple if False)    none (the model converts)
Deformable-DETR config        timm ResNet-50 by default    transformers' ResNet by default
============================  ===========================  ==================================

The self-attention call (``forward(hidden_states, attention_mask=None, position_embeddings=None,
...) -> (out, weights)``, RT-DETR's additive ``[L, L]`` denoising mask), the decoder outputs
(``intermediate_hidden_states``, ``intermediate_reference_points``), the two-stage and
denoising fields (``enc_outputs_class``/``enc_outputs_coord_logits``,
``enc_topk_logits``/``enc_topk_bboxes``) and the deformable sampling module
(``MultiScaleDeformableAttention.forward(value, value_spatial_shapes,
value_spatial_shapes_list, level_start_index, sampling_locations, attention_weights,
im2col_step)``) are the same in both.
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn

__all__ = [
    "backbone_config_kwargs",
    "layer_ffn",
    "layer_ffn_names",
    "layer_hidden",
    "query_position_arg",
    "request_model_output",
]

# names of the decoder's ``forward`` argument holding the object queries' position embeddings,
# newest first
_QUERY_POSITION_ARGS = ("object_queries_position_embeddings", "position_embeddings")


def query_position_arg(decoder: nn.Module) -> str | None:
    """Name of ``decoder.forward``'s query-position argument (``[B, Q, C]``, tiled per route),
    or None when it has neither known name."""
    params = inspect.signature(type(decoder).forward).parameters
    return next((n for n in _QUERY_POSITION_ARGS if n in params), None)


def request_model_output(decoder: nn.Module, arguments: dict) -> bool:
    """Make a decoder call (its bound ``arguments``, changed in place) return a ``ModelOutput``.

    4.57's decoders take ``return_dict`` (None: ``config.use_return_dict``) and return a plain
    tuple when it is False; 5.x decoders always return a ``ModelOutput``. Returns True when the
    caller asked for a tuple: convert the decoder's output with ``.to_tuple()`` (the non-None
    fields in order, exactly 4.57's tuple).
    """
    if "return_dict" not in inspect.signature(type(decoder).forward).parameters:
        return False
    wanted = arguments.get("return_dict")
    if wanted is None:
        wanted = decoder.config.use_return_dict
    arguments["return_dict"] = True
    return not wanted


def layer_ffn_names(layer: nn.Module) -> tuple[str, ...]:
    """Attribute names of an HF DETR-family decoder layer's FFN: ``("mlp",)`` (5.x) or
    ``("fc1", "fc2")`` (4.x, activation and dropout in the layer's forward)."""
    for names in (("mlp",), ("fc1", "fc2")):
        if all(isinstance(getattr(layer, n, None), nn.Module) for n in names):
            return names
    raise TypeError(
        f"{type(layer).__name__}: expected an FFN as `mlp` (transformers 5.x) or `fc1`/`fc2` "
        f"(4.x), found sub-modules {[n for n, _ in layer.named_children()]}"
    )


def layer_ffn(layer: nn.Module) -> tuple[nn.Module, ...]:
    """The FFN modules of an HF DETR-family decoder layer, named by :func:`layer_ffn_names`:
    ``(layer.mlp,)`` (5.x) or ``(layer.fc1, layer.fc2)`` (4.x)."""
    return tuple(getattr(layer, n) for n in layer_ffn_names(layer))


def layer_hidden(output) -> Tensor:
    """The hidden states ``[B, L, C]`` a decoder layer returned: the value itself (5.x) or the
    first entry of its tuple (4.x, followed by attention weights when asked for)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def backbone_config_kwargs(config_class: type) -> dict:
    """Extra keyword arguments for ``config_class`` (``DeformableDetrConfig``/``RTDetrConfig``)
    so that it builds the given ``backbone_config`` with transformers' own code, no timm and no
    pretrained download: 4.57's Deformable-DETR config otherwise asks for timm's ResNet-50 and
    refuses a ``backbone_config`` next to its default ``backbone="resnet50"``. Empty when the
    config has no such arguments in its ``__init__`` (5.x)."""
    params = inspect.signature(config_class.__init__).parameters
    if "use_timm_backbone" not in params:
        return {}
    return {"use_timm_backbone": False, "backbone": None, "use_pretrained_backbone": False}
