"""Tiny random-init detectors of every DETR family in HF transformers, and batches for them.

For tests of the integrations (no downloads, no timm, no pretrained weights, CPU, a fraction of a
second per forward pass): :func:`tiny_model` builds a small ``<Family>ForObjectDetection`` from
its config with transformers' own small backbones (basic-block ResNet, HGNetV2, ViT, DINOv2;
BERT / CLIP text models for the text-conditioned families), ``d_model = 32``, two decoder layers,
a few queries; :func:`tiny_batch` gives the inputs of that family's ``forward``.

Families (their ``transformers.models`` folder names, :data:`FAMILIES`): ``detr``,
``table_transformer``, ``conditional_detr``, ``dab_detr``, ``deformable_detr``, ``rt_detr``,
``rt_detr_v2``, ``d_fine``, ``deimv2``, ``lw_detr``, ``rf_detr``, ``grounding_dino``,
``mm_grounding_dino``, ``omdet_turbo``. :func:`family_available` says whether the installed
transformers ships one (4.57 lacks ``deimv2``, ``lw_detr`` and ``rf_detr``).
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

__all__ = ["FAMILIES", "TEXT_FAMILIES", "family_available", "tiny_batch", "tiny_model"]

FAMILIES = (
    "detr", "table_transformer", "conditional_detr", "dab_detr", "deformable_detr", "rt_detr",
    "rt_detr_v2", "d_fine", "deimv2", "lw_detr", "rf_detr", "grounding_dino",
    "mm_grounding_dino", "omdet_turbo",
)  # fmt: skip
TEXT_FAMILIES = ("grounding_dino", "mm_grounding_dino", "omdet_turbo")

# family -> (config class, model class) names in ``transformers``
_CLASSES = {
    "detr": ("DetrConfig", "DetrForObjectDetection"),
    "table_transformer": ("TableTransformerConfig", "TableTransformerForObjectDetection"),
    "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection"),
    "dab_detr": ("DabDetrConfig", "DabDetrForObjectDetection"),
    "deformable_detr": ("DeformableDetrConfig", "DeformableDetrForObjectDetection"),
    "rt_detr": ("RTDetrConfig", "RTDetrForObjectDetection"),
    "rt_detr_v2": ("RTDetrV2Config", "RTDetrV2ForObjectDetection"),
    "d_fine": ("DFineConfig", "DFineForObjectDetection"),
    "deimv2": ("Deimv2Config", "Deimv2ForObjectDetection"),
    "lw_detr": ("LwDetrConfig", "LwDetrForObjectDetection"),
    "rf_detr": ("RfDetrConfig", "RfDetrForObjectDetection"),
    "grounding_dino": ("GroundingDinoConfig", "GroundingDinoForObjectDetection"),
    "mm_grounding_dino": ("MMGroundingDinoConfig", "MMGroundingDinoForObjectDetection"),
    "omdet_turbo": ("OmDetTurboConfig", "OmDetTurboForObjectDetection"),
}

# BERT ids Grounding DINO treats as delimiters ([CLS], [SEP], "."): the phrases lie between them
_CLS, _SEP, _DOT, _FIRST_WORD = 101, 102, 1012, 2000


def _check_family(family) -> None:
    if family not in _CLASSES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def family_available(family: str) -> bool:
    """Whether the installed transformers has ``family`` (False when transformers is missing)."""
    _check_family(family)
    try:
        tf = importlib.import_module("transformers")
    except ImportError:
        return False
    return all(hasattr(tf, name) for name in _CLASSES[family])


def _no_download(config_cls) -> dict:
    """Keyword arguments that keep ``config_cls`` off timm and pretrained backbones (4.57)."""
    params = inspect.signature(config_cls.__init__).parameters
    off = {"use_timm_backbone": False, "use_pretrained_backbone": False, "backbone": None}
    return {k: v for k, v in off.items() if k in params}


def _resnet(tf, width: int, cls_name: str = "ResNetConfig", stages=("stage2", "stage3", "stage4")):
    """Basic-block ResNet, stage widths ``w, 2w, 4w, 4w``, one block per stage."""
    return getattr(tf, cls_name)(
        embedding_size=width, hidden_sizes=[width, 2 * width, 4 * width, 4 * width],
        depths=[1, 1, 1, 1], layer_type="basic", out_features=list(stages),
    )  # fmt: skip


def _hgnet(tf, width: int):
    """HGNetV2 with one block per stage, stages 2-4 (strides 8, 16, 32), out channels
    ``2w, 4w, 8w``."""
    return tf.HGNetV2Config(
        stem_channels=[3, width // 2, width],
        stage_in_channels=[width, width, 2 * width, 4 * width],
        stage_mid_channels=[width // 2, width, width, 2 * width],
        stage_out_channels=[width, 2 * width, 4 * width, 8 * width],
        stage_num_blocks=[1, 1, 1, 1], stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True], stage_kernel_size=[3, 3, 5, 5],
        stage_numb_of_layers=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"],
        embedding_size=width, hidden_sizes=[width, 2 * width, 4 * width, 8 * width],
    )  # fmt: skip


def _config(tf, family: str, d: int, num_queries: int, num_labels: int):
    """The small config of ``family`` (``d`` channels, two decoder layers, ``num_queries``)."""
    cfg_cls = getattr(tf, _CLASSES[family][0])
    common = {"num_queries": num_queries, "num_labels": num_labels}
    heads = {"encoder_attention_heads": 2, "decoder_attention_heads": 2}
    ffn = {"encoder_ffn_dim": 2 * d, "decoder_ffn_dim": 2 * d}
    detr_like = {
        **common, **heads, **ffn, "encoder_layers": 1, "decoder_layers": 2,
        "backbone_config": _resnet(tf, 16, stages=("stage4",)), "auxiliary_loss": True,
    }  # fmt: skip
    if family in ("detr", "table_transformer", "conditional_detr"):
        return cfg_cls(d_model=d, **detr_like, **_no_download(cfg_cls))
    if family == "dab_detr":
        return cfg_cls(hidden_size=d, **detr_like, **_no_download(cfg_cls))
    if family == "deformable_detr":
        return cfg_cls(
            d_model=d, **detr_like | {"backbone_config": _resnet(tf, 16)}, num_feature_levels=3,
            encoder_n_points=2, decoder_n_points=2, with_box_refine=True, two_stage=True,
            two_stage_num_proposals=num_queries, **_no_download(cfg_cls),
        )  # fmt: skip
    if family in ("rt_detr", "rt_detr_v2", "d_fine", "deimv2"):
        rt = {
            **common, **heads, **ffn, "d_model": d, "encoder_hidden_dim": d, "decoder_layers": 2,
            "decoder_in_channels": [d] * 3, "num_denoising": 6, "decoder_n_points": 2,
        }  # fmt: skip
        if family in ("rt_detr", "rt_detr_v2"):
            backbone = _resnet(tf, 16, "RTDetrResNetConfig")
            return cfg_cls(backbone_config=backbone, encoder_in_channels=[32, 64, 64], **rt)
        extra = {"decoder_n_points": [2, 2, 2]} if family == "d_fine" else {}
        return cfg_cls(
            backbone_config=_hgnet(tf, 16), encoder_in_channels=[32, 64, 128], **rt | extra,
            hidden_expansion=0.5, depth_mult=0.34, lqe_hidden_dim=8, max_num_bins=8,
        )  # fmt: skip
    if family in ("lw_detr", "rf_detr"):
        vit = {
            "hidden_size": d, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8,
            "image_size": 64, "num_windows": 1, "out_indices": [1, 2],
        }  # fmt: skip
        if family == "lw_detr":
            backbone = tf.LwDetrViTConfig(**vit, window_block_indices=[0], pretrain_image_size=64)
        else:
            backbone = tf.RfDetrDinov2Config(**vit)
        return cfg_cls(
            backbone_config=backbone, d_model=d, decoder_layers=2, decoder_ffn_dim=2 * d,
            decoder_self_attention_heads=2, decoder_cross_attention_heads=2,
            decoder_n_points=2, group_detr=2, projector_scale_factors=[1.0], **common,
        )  # fmt: skip
    if family in ("grounding_dino", "mm_grounding_dino"):
        text = tf.BertConfig(
            vocab_size=_FIRST_WORD + 16, hidden_size=d, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=2 * d, max_position_embeddings=32,
        )  # fmt: skip
        return cfg_cls(
            backbone_config=_resnet(tf, 16), text_config=text, d_model=d, **heads, **ffn,
            encoder_layers=1, decoder_layers=2, **common, num_feature_levels=3,
            encoder_n_points=2, decoder_n_points=2, max_text_len=16, auxiliary_loss=True,
            **_no_download(cfg_cls),
        )  # fmt: skip
    # class_embed_dim (= the text width: task tokens are not projected) != decoder_hidden_dim:
    # transformers creates OmDetTurboDecoder.task_project only then, yet reads it always
    text = tf.CLIPTextConfig(
        vocab_size=64, hidden_size=2 * d, intermediate_size=2 * d, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=d, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return cfg_cls(
        backbone_config=_resnet(tf, 16), text_config=text, **_no_download(cfg_cls),
        text_projection_in_dim=2 * d, text_projection_out_dim=2 * d, task_encoder_hidden_dim=2 * d,
        class_embed_dim=2 * d, **common, encoder_hidden_dim=d,
        vision_features_channels=[d, d, d], encoder_in_channels=[32, 64, 64],
        encoder_attention_heads=2, encoder_dim_feedforward=2 * d, decoder_hidden_dim=d,
        decoder_num_heads=2, decoder_num_layers=2, decoder_dim_feedforward=2 * d,
        decoder_num_points=2, image_size=64, apply_layernorm_after_vision_backbone=False,
    )  # fmt: skip


def tiny_model(
    family: str, *, seed: int = 0, num_labels: int = 3, num_queries: int = 8, d_model: int = 32
) -> nn.Module:
    """A random-init ``<Family>ForObjectDetection`` of ``family`` in train mode.

    Args:
        family: one of :data:`FAMILIES`.
        seed: ``torch.manual_seed`` before building (the global RNG is changed).
        num_labels: classes ``K`` (text families: phrases of :func:`tiny_batch`'s prompt).
        num_queries: object queries (LW-DETR / RF-DETR: per group; two groups in training).
        d_model: decoder channels (32 or 64 keep it tiny; a multiple of 32).

    Every dropout (and drop path) of the config and its text model is 0, so two forward passes
    on equal inputs are equal.

    Raises:
        ValueError: an unknown ``family`` or a ``d_model`` that is not a positive multiple of 32.
        ImportError: transformers is missing or lacks ``family`` (see :func:`family_available`).
    """
    _check_family(family)
    if not isinstance(d_model, int) or d_model < 32 or d_model % 32:
        raise ValueError(f"d_model must be a positive multiple of 32, got {d_model!r}")
    if not family_available(family):
        raise ImportError(f"the installed transformers has no {family!r} family")
    tf = importlib.import_module("transformers")
    config = _config(tf, family, d_model, num_queries, num_labels)
    text = getattr(config, "text_config", None)  # BERT / CLIP text models drop out too
    for cfg in (config, *([text] if text is not None else [])):
        for name, value in vars(cfg).items():  # deterministic passes: tests compare two models
            if ("dropout" in name or "droppath" in name) and isinstance(value, float):
                setattr(cfg, name, 0.0)
    torch.manual_seed(seed)
    return getattr(tf, _CLASSES[family][1])(config).train()


def _family_of(model: nn.Module) -> str:
    name = type(model).__name__
    for family, (_, cls_name) in _CLASSES.items():
        if cls_name == name:
            return family
    raise TypeError(f"model must be one of the {FAMILIES} detectors, got {name}")


def tiny_batch(
    model: nn.Module, *, batch: int = 2, image_size: int = 64, max_objects: int = 3, seed: int = 0
) -> dict:
    """Keyword arguments for ``model(**kwargs)``: random images, labels and, for the text
    families, the prompt.

    Returns:
        ``pixel_values`` (``[B, 3, S, S]``), ``labels`` (list of ``B`` dicts: ``class_labels``
        int64 ``[n]`` in ``[0, K)``, ``boxes`` ``[n, 4]`` normalised ``cx, cy, w, h``; omitted
        for ``omdet_turbo``, which has no loss); Grounding DINO families: ``input_ids``
        and ``attention_mask`` ``[B, T]`` (``[CLS] w0 . w1 . ... [SEP]``, one phrase per class);
        OmDet-Turbo: ``classes_input_ids`` / ``classes_attention_mask`` (``[B*K, T]``),
        ``tasks_input_ids`` / ``tasks_attention_mask`` (``[B, T]``), ``classes_structure``
        (``[B]``, ``K`` each).
    """
    family = _family_of(model)
    k = model.config.num_labels
    g = torch.Generator().manual_seed(seed)
    out: dict = {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g)}
    labels = []
    for _ in range(batch):
        n = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        centre = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        size = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        labels.append({
            "class_labels": torch.randint(0, k, (n,), generator=g),
            "boxes": torch.cat([centre, size], 1),
        })  # fmt: skip
    if family != "omdet_turbo":
        out["labels"] = labels
    if family in ("grounding_dino", "mm_grounding_dino"):
        words = [[_FIRST_WORD + i, _DOT] for i in range(k)]
        ids = torch.tensor([_CLS, *sum(words, []), _SEP]).expand(batch, -1).clone()
        out.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    elif family == "omdet_turbo":
        classes = torch.randint(3, 60, (batch * k, 4), generator=g)
        tasks = torch.randint(3, 60, (batch, 6), generator=g)
        out.update(
            classes_input_ids=classes, classes_attention_mask=torch.ones_like(classes),
            tasks_input_ids=tasks, tasks_attention_mask=torch.ones_like(tasks),
            classes_structure=torch.full((batch,), k, dtype=torch.long),
        )  # fmt: skip
    return out
