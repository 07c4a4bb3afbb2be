"""``wrap`` faced with what users do: a route-set function not called, a single route, bad
``route_weights``, ``torch.inference_mode``, gradient checkpointing, ``return_dict=False``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mrdetr import adapters, routes  # noqa: E402
from mrdetr.testing.hf_families import tiny_batch, tiny_model  # noqa: E402

AUX = ("aux_ffn", "aux_instruct")


@pytest.mark.parametrize(
    "bad, message",
    [(routes.mr_detr, r"got the function mr_detr: call it"),
     (routes.mr_detr()[1], r"got a single Route 'aux_ffn'"),
     (3, r"routes must be a sequence of Route, got int")],
)  # fmt: skip
def test_routes_argument_says_what_was_expected(bad, message):
    with pytest.raises(TypeError, match=message):
        adapters.wrap(tiny_model("deformable_detr"), bad)


@pytest.mark.parametrize(
    "weights, message",
    [({"aux_fn": 1.0}, r"unknown route 'aux_fn'"),
     ({"primary": 1.0}, r"'primary' is the primary route"),
     ({"aux_ffn": -1.0}, r"route_weights\['aux_ffn'\] must be a finite number >= 0, got -1.0"),
     ({"aux_ffn": True}, r"got True"),
     ({"aux_ffn": float("nan")}, r"got nan"),
     ([("aux_ffn", 1.0)], r"route_weights must be a mapping")],
)  # fmt: skip
def test_bad_route_weights_are_named(weights, message):
    with pytest.raises((ValueError, TypeError), match=message):
        adapters.wrap(tiny_model("deformable_detr"), route_weights=weights)


def test_route_weights_need_a_whole_hf_detector():
    decoder = tiny_model("deformable_detr").model.decoder
    with pytest.raises(ValueError, match="route_weights: only a whole HF detector"):
        adapters.wrap(decoder, route_weights={"aux_ffn": 1.0})


def test_wrap_under_inference_mode_gives_trainable_parameters():
    model = tiny_model("deformable_detr")
    with torch.inference_mode():
        adapters.wrap(model)
    assert not any(p.is_inference() for p in model.parameters())
    model(**tiny_batch(model)).loss.backward()
    decoder = model.model.decoder
    assert all(p.grad is not None for p in decoder.mrdetr_routes.parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_is_refused_clearly(reentrant):
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5.x
        model = tiny_model("deformable_detr")
        model.gradient_checkpointing_enable(**kwargs)
        with pytest.raises(ValueError, match="gradient checkpointing is not supported"):
            adapters.wrap(model)
        model = tiny_model("deformable_detr")
        adapters.wrap(model)
        model.gradient_checkpointing_enable(**kwargs)
    with pytest.raises(RuntimeError, match=r"gradient_checkpointing_disable\(\)"):
        model(**tiny_batch(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()
    assert torch.isfinite(model(**tiny_batch(model)).loss)


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x DeformableDetr fails on return_dict=False with auxiliary_loss itself",
)
def test_return_dict_false_carries_the_same_route_losses():
    model = tiny_model("deformable_detr")
    adapters.wrap(model)
    batch = tiny_batch(model)
    as_dict = model(**batch)
    as_tuple = model(**batch, return_dict=False)
    assert torch.equal(as_tuple[0], as_dict.loss)
    assert as_tuple[1].keys() == as_dict.loss_dict.keys()
    assert any(k.startswith("aux_instruct/") for k in as_tuple[1])


def test_unwrap_restores_the_detector_forward():
    model = tiny_model("deformable_detr")
    plain = copy.deepcopy(model)
    adapters.wrap(model)
    adapters.unwrap(model)
    assert "forward" not in model.__dict__
    batch = tiny_batch(model)
    assert torch.equal(model(**batch).loss, plain(**batch).loss)


def test_a_zero_weight_leaves_only_that_route_out():
    model = tiny_model("deformable_detr")
    plain = copy.deepcopy(model)
    adapters.wrap(model, route_weights={"aux_instruct": 0.0, "aux_ffn": 2.0})
    batch = tiny_batch(model)
    out = model(**batch)
    assert any(k.startswith("aux_ffn/") for k in out.loss_dict)
    assert not any(k.startswith("aux_instruct/") for k in out.loss_dict)
    assert not torch.equal(out.loss, plain(**batch).loss)


def test_no_route_loss_from_an_earlier_step_when_the_decoder_ran_in_eval():
    model = tiny_model("deformable_detr")
    plain = copy.deepcopy(model)
    adapters.wrap(model)
    batch = tiny_batch(model)
    model(**batch)  # a training step leaves its routes' outputs
    model.model.decoder.eval()  # the routes do not run: no route loss, none stale either
    plain.model.decoder.eval()
    out = model(**batch)
    assert not any("/" in k for k in out.loss_dict)
    assert torch.equal(out.loss, plain(**batch).loss)


@pytest.mark.parametrize("family", ["conditional_detr", "table_transformer"])
def test_decoder_layerdrop_is_refused_at_wrap_and_in_training(family):
    model = tiny_model(family)
    decoder = model.model.decoder
    decoder.layerdrop = 0.5
    with pytest.raises(ValueError, match=r"layerdrop = 0.5 skips whole decoder layers"):
        adapters.wrap(model)
    assert not adapters.is_wrapped(model)
    decoder.layerdrop = 0.0
    adapters.wrap(model)
    batch = tiny_batch(model)
    decoder.layerdrop = 0.25  # set after wrap: refused at the training call, not an IndexError
    with pytest.raises(RuntimeError, match=r"layerdrop = 0.25 .*Set decoder.layerdrop = 0.0"):
        model(**batch)
    model.eval()  # eval never drops layers: the original forward runs
    model(pixel_values=batch["pixel_values"])
