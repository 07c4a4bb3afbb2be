"""use_fast_deformable_attention: HF's own sampling is the oracle (outputs, grads, save/load)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from mrdetr.adapters import restore_deformable_attention, use_fast_deformable_attention  # noqa: E402
from mrdetr.adapters.fast_attention import FastDeformableSampling  # noqa: E402
from mrdetr.testing.hf_models import (  # noqa: E402
    hf_deformable_detr,
    hf_rt_detr,
    random_detection_batch,
)

BUILDERS = {
    "deformable": lambda: hf_deformable_detr(),
    "deformable_refine_two_stage": lambda: hf_deformable_detr(with_box_refine=True, two_stage=True),
    "rt_detr": lambda: hf_rt_detr(),
}


def _hf_labels(targets):
    return [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in targets]


def _samplers(model):
    return [m for m in model.modules() if type(m).__name__ == "MultiScaleDeformableAttention"]


def _fast(model):
    return [m for m in model.modules() if isinstance(m, FastDeformableSampling)]


def _jitter_offsets(model):
    """At Deformable-DETR's initialisation every encoder sampling point sits exactly on a pixel
    centre, where bilinear interpolation has no derivative (each implementation picks one side);
    move the points off the grid so that gradients are comparable."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("sampling_offsets.bias"):
            p.add_(torch.rand(p.shape, generator=g) * 0.2 - 0.1)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_outputs_and_gradients_equal_hf(name):
    """Same weights, same (train-mode, denoising included) forward: outputs and every parameter
    gradient equal HF's pure-PyTorch sampling to float32 rounding."""
    ref = BUILDERS[name]()
    with torch.no_grad():  # see _jitter_offsets
        _jitter_offsets(ref)
    fast = copy.deepcopy(ref)
    n = len(_samplers(ref))
    assert n > 0
    assert use_fast_deformable_attention(fast, backend="cpu") is fast
    assert len(_fast(fast)) == n and not _samplers(fast)
    pixels, targets = random_detection_batch(image_size=64)
    results = []
    for model in (ref, fast):
        torch.manual_seed(1)  # RT-DETR's denoising noise is random: same draw for both
        out = model(pixels, labels=_hf_labels(targets))
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits, out.pred_boxes, grads))
    (l0, b0, g0), (l1, b1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b1, b0, rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    scale = max(g.abs().max() for g in g0.values())  # many gradients are ~1e-8 rounding noise
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-5 * scale, msg=k)


def test_restore_gives_back_hf_modules_and_outputs():
    model = hf_deformable_detr(with_box_refine=True).eval()
    originals = _samplers(model)
    pixels, _ = random_detection_batch()
    with torch.no_grad():
        before = model(pixels).logits
        use_fast_deformable_attention(model, backend="pytorch")
        assert restore_deformable_attention(model) is model
        after = model(pixels).logits
    assert _samplers(model) == originals and not _fast(model)  # the very same module objects
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_state_dict_unchanged_and_save_pretrained_round_trip(tmp_path):
    """The swap adds and removes nothing from the state dict; a checkpoint saved by the swapped
    model loads with from_pretrained and gives the same outputs once swapped again."""
    model = hf_rt_detr().eval()
    keys = list(model.state_dict())
    use_fast_deformable_attention(model, backend="cpu")
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert _samplers(loaded) and not _fast(loaded)  # a fresh HF model
    use_fast_deformable_attention(loaded, backend="cpu")
    pixels, _ = random_detection_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)


def test_deepcopy_pickle_and_repeat_call():
    model = hf_deformable_detr().eval()
    use_fast_deformable_attention(model, backend="pytorch")
    use_fast_deformable_attention(model, backend="cpu")  # second call: only the backend changes
    assert {m.backend for m in _fast(model)} == {"cpu"}
    assert all(type(m.replaced).__name__ == "MultiScaleDeformableAttention" for m in _fast(model))
    pixels, _ = random_detection_batch()
    with torch.no_grad():
        expected = model(pixels).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(pixels).logits, expected, rtol=0, atol=0)
            restore_deformable_attention(clone)
            assert _samplers(clone) and not _fast(clone)


def test_inference_mode():
    model = hf_deformable_detr(with_box_refine=True, two_stage=True).eval()
    ref = copy.deepcopy(model)
    use_fast_deformable_attention(model, backend="cpu")
    pixels, _ = random_detection_batch()
    with torch.inference_mode():
        torch.testing.assert_close(model(pixels).pred_boxes, ref(pixels).pred_boxes)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        use_fast_deformable_attention("not a model")
    with pytest.raises(ValueError, match="holds no HF transformers MultiScaleDeformableAttention"):
        use_fast_deformable_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        use_fast_deformable_attention(hf_deformable_detr(), backend="tpu")
