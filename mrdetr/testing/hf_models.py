"""Small random-init HF transformers detectors for tests, examples and benchmarks (no downloads).

Both builders use a small ``ResNetConfig`` backbone built by transformers itself (no timm, no
torchvision, no pretrained weights) and build in well under a second at the default sizes.
transformers (4.57 or 5.x) is the optional ``hf`` extra: it is imported when a builder is called.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..adapters.hf_compat import backbone_config_kwargs

__all__ = ["hf_deformable_detr", "hf_rt_detr", "random_detection_batch", "require_transformers"]


def require_transformers():
    """Import and return ``transformers``, or raise ``ImportError`` naming the extra."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs HF transformers: pip install 'mrdetr[hf]' (transformers>=4.57; tested "
            "with 4.57 and 5.x)"
        ) from err
    return transformers


def _resnet(config_cls, width: int, depth: int):
    """A 4-stage basic-block ResNet config returning stages 2-4 (strides 8, 16, 32)."""
    return config_cls(
        embedding_size=width,
        hidden_sizes=[width, 2 * width, 4 * width, 4 * width],
        depths=[depth] * 4,
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )


def _resnet50(config_cls):
    """transformers' default ResNet-50 (bottleneck blocks 3-4-6-3, widths 256-2048), stages 2-4
    (strides 8, 16, 32): the backbone ``DeformableDetrConfig`` uses when none is given."""
    return config_cls(layer_type="bottleneck", out_features=["stage2", "stage3", "stage4"])


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def hf_deformable_detr(
    *,
    d_model: int = 32,
    encoder_layers: int = 1,
    decoder_layers: int = 2,
    num_heads: int = 4,
    ffn_dim: int = 64,
    num_queries: int = 10,
    num_labels: int = 3,
    num_feature_levels: int = 4,
    num_points: int = 2,
    with_box_refine: bool = False,
    two_stage: bool = False,
    dropout: float = 0.0,
    backbone_width: int = 16,
    backbone_depth: int = 1,
    backbone: str = "basic",
    seed: int = 0,
) -> nn.Module:
    """A random-init ``transformers.DeformableDetrForObjectDetection`` (train mode).

    Args:
        d_model: channels (a multiple of 32: the input projections use ``GroupNorm(32, C)``).
        encoder_layers, decoder_layers, num_heads, ffn_dim: transformer sizes.
        num_queries: object queries (also the two-stage proposals).
        num_labels: classes ``K``.
        num_feature_levels: levels ``L`` (3 from the backbone, more by strided convolutions).
        num_points: sampling points per head and level, encoder and decoder.
        with_box_refine: iterative box refinement (``model.model.decoder.bbox_embed``).
        two_stage: encoder proposals (requires ``with_box_refine``, as in transformers).
        dropout: the config's ``dropout`` (transformers' default is 0.1).
        backbone_width, backbone_depth: ResNet stage widths ``w, 2w, 4w, 4w`` and blocks per
            stage of the ``"basic"`` backbone.
        backbone: ``"basic"`` (the small basic-block ResNet above) or ``"resnet50"``
            (transformers' default ResNet-50, the backbone of the published models, random
            init; ``backbone_width``/``backbone_depth`` must then keep their defaults).
        seed: ``torch.manual_seed`` before building (the global RNG is changed).

    Image sizes: transformers normalises each level's input projection with
    ``GroupNorm(32, d_model)``; at ``d_model=32`` (one channel per group) a level of 1 x 1
    pixels has one value per group, which GroupNorm refuses in training for a batch of one
    image. With 4 levels the smallest has stride 64: train on one image only when it is larger
    than 64 px (or use ``d_model >= 64`` or batches of two or more).

    Raises:
        ValueError: non-positive sizes, ``d_model`` not a multiple of 32 or of ``num_heads``,
            ``two_stage`` without ``with_box_refine``, an unknown ``backbone``, or
            ``backbone_width``/``backbone_depth`` given with ``backbone="resnet50"``.
    """
    _check_positive(
        d_model=d_model, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        num_heads=num_heads, ffn_dim=ffn_dim, num_queries=num_queries, num_labels=num_labels,
        num_feature_levels=num_feature_levels, num_points=num_points,
        backbone_width=backbone_width, backbone_depth=backbone_depth,
    )  # fmt: skip
    if d_model % 32 != 0 or d_model % num_heads != 0:
        raise ValueError(
            f"d_model must be a multiple of 32 and of num_heads={num_heads}, got {d_model}"
        )
    if two_stage and not with_box_refine:
        raise ValueError("two_stage=True needs with_box_refine=True (as in transformers)")
    if backbone not in ("basic", "resnet50"):
        raise ValueError(f"backbone must be 'basic' or 'resnet50', got {backbone!r}")
    if backbone == "resnet50" and (backbone_width, backbone_depth) != (16, 1):
        raise ValueError(
            "backbone_width/backbone_depth size the 'basic' backbone only, got "
            f"backbone_width={backbone_width}, backbone_depth={backbone_depth} with 'resnet50'"
        )
    tf = require_transformers()
    config = tf.DeformableDetrConfig(
        backbone_config=(
            _resnet50(tf.ResNetConfig)
            if backbone == "resnet50"
            else _resnet(tf.ResNetConfig, backbone_width, backbone_depth)
        ),
        d_model=d_model,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=num_heads,
        decoder_attention_heads=num_heads,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        num_queries=num_queries,
        two_stage_num_proposals=num_queries,
        num_labels=num_labels,
        num_feature_levels=num_feature_levels,
        encoder_n_points=num_points,
        decoder_n_points=num_points,
        with_box_refine=with_box_refine,
        two_stage=two_stage,
        dropout=dropout,
        **backbone_config_kwargs(tf.DeformableDetrConfig),
    )
    torch.manual_seed(seed)
    return tf.DeformableDetrForObjectDetection(config).train()


def hf_rt_detr(
    *,
    d_model: int = 32,
    decoder_layers: int = 2,
    num_heads: int = 4,
    ffn_dim: int = 64,
    num_queries: int = 10,
    num_labels: int = 3,
    num_points: int = 2,
    num_denoising: int = 8,
    dropout: float = 0.0,
    backbone_width: int = 16,
    backbone_depth: int = 1,
    seed: int = 0,
) -> nn.Module:
    """A random-init ``transformers.RTDetrForObjectDetection`` (train mode, box refinement on).

    With ``num_denoising > 0`` and ``labels`` passed to ``forward`` in training, transformers
    puts contrastive denoising queries in front of the matching queries (DINO style).

    Args:
        d_model: channels of encoder and decoder.
        decoder_layers, num_heads, ffn_dim: decoder sizes (the hybrid encoder has one layer).
        num_queries: matching queries.
        num_labels: classes ``K``.
        num_points: decoder sampling points per head and level (3 levels).
        num_denoising: denoising queries (0 turns denoising off).
        dropout: the config's ``dropout``.
        backbone_width, backbone_depth: ResNet stage widths ``w, 2w, 4w, 4w`` and blocks per stage.
        seed: ``torch.manual_seed`` before building.
    """
    _check_positive(
        d_model=d_model, decoder_layers=decoder_layers, num_heads=num_heads, ffn_dim=ffn_dim,
        num_queries=num_queries, num_labels=num_labels, num_points=num_points,
        backbone_width=backbone_width, backbone_depth=backbone_depth,
    )  # fmt: skip
    if d_model % num_heads != 0:
        raise ValueError(f"d_model must be a multiple of num_heads={num_heads}, got {d_model}")
    if not isinstance(num_denoising, int) or num_denoising < 0:
        raise ValueError(f"num_denoising must be an int >= 0, got {num_denoising!r}")
    tf = require_transformers()
    w = backbone_width
    config = tf.RTDetrConfig(
        backbone_config=_resnet(tf.RTDetrResNetConfig, w, backbone_depth),
        d_model=d_model,
        encoder_hidden_dim=d_model,
        encoder_in_channels=[2 * w, 4 * w, 4 * w],
        decoder_in_channels=[d_model] * 3,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        encoder_attention_heads=num_heads,
        decoder_attention_heads=num_heads,
        decoder_layers=decoder_layers,
        num_queries=num_queries,
        num_labels=num_labels,
        decoder_n_points=num_points,
        num_denoising=num_denoising,
        dropout=dropout,
        **backbone_config_kwargs(tf.RTDetrConfig),
    )
    torch.manual_seed(seed)
    return tf.RTDetrForObjectDetection(config).train()


def random_detection_batch(
    *,
    batch: int = 2,
    image_size: int = 64,
    num_labels: int = 3,
    max_objects: int = 4,
    seed: int = 0,
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Random images and 1..``max_objects`` random boxes per image.

    Returns:
        ``(pixel_values Tensor[B, 3, S, S], targets)``; every target holds ``"labels"`` and (the
        same tensor) ``"class_labels"`` (int64 ``[N]``, transformers' name) and ``"boxes"``
        (``[N, 4]`` normalised ``cx, cy, w, h``), so it serves both mrdetr's criterion and
        transformers' ``labels=``.
    """
    _check_positive(batch=batch, image_size=image_size, num_labels=num_labels)
    _check_positive(max_objects=max_objects)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        centre = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        size = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        labels = torch.randint(0, num_labels, (n,), generator=g)
        boxes = torch.cat([centre, size], 1)
        targets.append({"labels": labels, "class_labels": labels, "boxes": boxes})
    return pixels, targets
