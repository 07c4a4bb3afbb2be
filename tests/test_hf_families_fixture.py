"""The tiny HF detectors of mrdetr.testing.hf_families: every family trains (finite loss by its own
loss function) and predicts, with no downloads; families the installed transformers lacks skip."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from _threads import intra_op_threads  # noqa: E402

from mrdetr.testing.hf_families import (  # noqa: E402
    FAMILIES,
    TEXT_FAMILIES,
    family_available,
    tiny_batch,
    tiny_model,
)

# What each family's own loss reports (transformers' loss functions, read from their source):
# the classification term names the loss type (loss_ce: softmax with no-object for DETR / Table
# Transformer, sigmoid focal for the deformable families, IoU-aware BCE for LW-/RF-DETR; VFL for
# RT-DETR; VFL + FGL for D-FINE; MAL + FGL for DEIMv2). None: no training loss (OmDet-Turbo).
LOSS_TERMS = {
    "detr": ("loss_ce", "loss_bbox", "loss_giou"),
    "table_transformer": ("loss_ce", "loss_bbox", "loss_giou"),
    "conditional_detr": ("loss_ce", "loss_bbox", "loss_giou"),
    "dab_detr": ("loss_ce", "loss_bbox", "loss_giou"),
    "deformable_detr": ("loss_ce", "loss_bbox", "loss_giou"),
    "rt_detr": ("loss_vfl", "loss_bbox", "loss_giou", "loss_vfl_dn_0"),
    "rt_detr_v2": ("loss_vfl", "loss_bbox", "loss_giou", "loss_vfl_dn_0"),
    "d_fine": ("loss_vfl", "loss_bbox", "loss_giou", "loss_fgl_aux_0", "loss_vfl_dn_0"),
    "deimv2": ("loss_mal", "loss_bbox", "loss_giou", "loss_fgl_aux_0", "loss_mal_dn_0"),
    "lw_detr": ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc"),
    "rf_detr": ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc"),
    "grounding_dino": ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc"),
    "mm_grounding_dino": ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc"),
    "omdet_turbo": None,
}
NO_OBJECT_CLASS = ("detr", "table_transformer")  # softmax over K + 1 classes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one thread avoids oversubscription on busy CI machines."""
    with intra_op_threads(1):
        yield


def _model(family, **kwargs):
    if not family_available(family):
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {family}")
    return tiny_model(family, **kwargs)


def _logits_and_boxes(family, output):
    if family == "omdet_turbo":
        return output.decoder_class_logits, output.decoder_coord_logits
    return output.logits, output.pred_boxes


def test_every_family_is_listed():
    assert set(FAMILIES) == set(LOSS_TERMS) and len(FAMILIES) == 14
    assert set(TEXT_FAMILIES) <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_forward_gives_the_family_loss(family):
    model = _model(family, num_labels=3)
    assert model.training
    batch = tiny_batch(model, batch=2)
    output = model(**batch)
    terms = LOSS_TERMS[family]
    if terms is None:
        assert "labels" not in batch
        logits, boxes = _logits_and_boxes(family, output)
        assert torch.isfinite(logits).all() and torch.isfinite(boxes).all()
        return
    assert output.loss.dim() == 0 and math.isfinite(output.loss.item())
    assert set(terms) <= set(output.loss_dict), sorted(output.loss_dict)
    output.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_forward_predicts_every_query(family):
    model = _model(family, num_labels=3, num_queries=8).eval()
    batch = {k: v for k, v in tiny_batch(model, batch=2).items() if k != "labels"}
    with torch.no_grad():
        logits, boxes = _logits_and_boxes(family, model(**batch))
    if family in ("grounding_dino", "mm_grounding_dino"):
        classes = model.config.max_text_len  # one logit per text token
    elif family == "omdet_turbo":
        classes = 3  # one logit per prompted class
    else:
        classes = 3 + (family in NO_OBJECT_CLASS)
    if family == "omdet_turbo":
        assert logits.shape[0] == 2 and logits.shape[-1] == classes
    else:
        assert logits.shape == (2, 8, classes)
    assert boxes.shape[:-1] == logits.shape[:-1] and boxes.shape[-1] == 4
    if family in ("grounding_dino", "mm_grounding_dino"):  # -inf past the prompt's tokens
        prompt = batch["input_ids"].shape[1]
        assert torch.isneginf(logits[..., prompt:]).all()
        logits = logits[..., :prompt]
    assert torch.isfinite(logits).all() and ((boxes >= 0) & (boxes <= 1)).all()


@pytest.mark.parametrize("family", ["detr", "rt_detr", "d_fine", "grounding_dino"])
def test_seed_fixes_the_weights(family):
    a, b, c = (_model(family, seed=s) for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_batch_labels_are_in_range():
    model = _model("grounding_dino", num_labels=4)
    batch = tiny_batch(model, batch=3, max_objects=2)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    for target in batch["labels"]:
        assert 1 <= len(target["class_labels"]) <= 2
        assert ((target["class_labels"] >= 0) & (target["class_labels"] < 4)).all()
        xyxy = torch.cat([target["boxes"][:, :2] - target["boxes"][:, 2:] / 2,
                          target["boxes"][:, :2] + target["boxes"][:, 2:] / 2], 1)  # fmt: skip
        assert ((xyxy >= 0) & (xyxy <= 1)).all()
    # one phrase per class between [CLS] and [SEP], each ended by "."
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == 101 and ids[-1] == 102 and ids.count(1012) == 4


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="family"):
        tiny_model("yolo")
    with pytest.raises(ValueError, match="d_model"):
        tiny_model("detr", d_model=48)
    with pytest.raises(TypeError, match="model"):
        tiny_batch(torch.nn.Linear(2, 2))
