"""mrdetr.adapters on HF DeformableDetr (refinement, two-stage) and RT-DETR (denoising).

Oracles: the unwrapped model (eval, the primary route, save/load) and each route run alone
through a copy of the unwrapped model with that route's modules swapped in (tests/_hf_oracle.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from _hf_oracle import randomise, route_copy, save_pretrained_kwargs  # noqa: E402

from mrdetr import MultiRouteCriterion, RouteMatcher, adapters, routes  # noqa: E402
from mrdetr.testing.hf_models import (  # noqa: E402
    hf_deformable_detr,
    hf_rt_detr,
    random_detection_batch,
)

DEFORMABLE = {
    "points": {},
    "refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}
ROUTES = routes.mr_detr(num_instruction_tokens=3)


def _labels(targets):
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


PRIMARY_LOSS = {r.name: 0.0 for r in ROUTES[1:]}  # the model's own loss: the primary route's


def _wrapped(builder, route_weights=None, **kw):
    model = builder(**kw)
    adapters.wrap(model, ROUTES, route_weights=route_weights)
    randomise(model)
    return model


def _aux_only(model):
    decoder = next(m for m in model.modules() if "mrdetr_routes" in m._modules)
    return dict(decoder.mrdetr_routes.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(DEFORMABLE))
def test_deformable_detr_eval_bitwise_and_routes_equal_unpacked_oracle(variant):
    model = _wrapped(hf_deformable_detr, **DEFORMABLE[variant])
    pixels, _ = random_detection_batch()
    out = model(pixels)
    outs = adapters.route_outputs(model)
    preds = adapters.hf_route_predictions(model, outs, out)
    assert list(preds) == [r.name for r in ROUTES]
    for i, route in enumerate(ROUTES):
        oracle = route_copy(model, i)
        expected = oracle(pixels)
        hidden = expected.intermediate_hidden_states.transpose(0, 1)  # [N, B, Q, C]
        torch.testing.assert_close(outs.hidden_states[:, i], hidden, rtol=1e-4, atol=1e-5)
        got = preds[route.name]
        torch.testing.assert_close(got["pred_logits"], expected.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, rtol=1e-4, atol=1e-5)
        if i == 0:  # the model's own outputs are the primary route's
            torch.testing.assert_close(out.pred_boxes, expected.pred_boxes, rtol=1e-5, atol=1e-6)
    assert ("enc_outputs" in preds["primary"]) == (variant == "two_stage")
    plain = route_copy(model, 0).eval()
    model.eval()
    with torch.no_grad():
        a, b = model(pixels), plain(pixels)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)


@pytest.mark.slow
def test_rt_detr_routes_equal_oracle_and_denoising_stays_primary():
    model = _wrapped(hf_rt_detr, PRIMARY_LOSS)
    pixels, targets = random_detection_batch()
    torch.manual_seed(7)  # denoising noise
    out = model(pixels, labels=_labels(targets))
    outs = adapters.route_outputs(model)
    dn = out.denoising_meta_values["dn_num_split"][0]
    assert dn > 0 and out.logits.shape[1] == dn + model.config.num_queries
    preds = adapters.hf_route_predictions(model, outs, out)
    # primary: denoising + matching queries exactly as the unwrapped model with the same draw
    torch.manual_seed(7)
    expected = route_copy(model, 0)(pixels, labels=_labels(targets))
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pred_boxes, expected.pred_boxes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-4, atol=1e-5)
    matching = expected.pred_boxes[:, dn:]
    torch.testing.assert_close(preds["primary"]["pred_boxes"], matching, rtol=1e-4, atol=1e-5)
    # auxiliary routes: matching queries only, as a pass without denoising
    for i, route in enumerate(ROUTES[1:], start=1):
        expected = route_copy(model, i)(pixels)
        got = preds[route.name]
        torch.testing.assert_close(got["pred_logits"], expected.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, route_copy(model, 0).eval()(pixels).logits)


def test_rt_detr_denoising_queries_never_see_instruction_tokens():
    """Changing the instruction tokens (and every auxiliary copy) changes nothing in the
    primary route, denoising queries included; its loss gives them no (or zero) gradient."""
    model = _wrapped(hf_rt_detr, PRIMARY_LOSS)
    pixels, targets = random_detection_batch()
    torch.manual_seed(3)
    before = model(pixels, labels=_labels(targets))
    adapters.route_outputs(model)
    before.loss.backward()  # transformers' own loss: primary route, denoising included
    assert all(p.grad is None or not p.grad.any() for p in _aux_only(model).values())
    with torch.no_grad():
        for p in _aux_only(model).values():
            p.add_(torch.randn_like(p))
    torch.manual_seed(3)
    after = model(pixels, labels=_labels(targets))
    assert torch.equal(after.logits, before.logits)


@pytest.mark.parametrize("builder", ["deformable", "rt_detr"])
def test_gradients_reach_new_and_shared_parameters(builder):
    make = {"deformable": lambda: _wrapped(hf_deformable_detr, with_box_refine=True),
            "rt_detr": lambda: _wrapped(hf_rt_detr)}[builder]  # fmt: skip
    model = make()
    pixels, targets = random_detection_batch()
    out = model(pixels)
    preds = adapters.hf_route_predictions(model, adapters.route_outputs(model), out)
    criterion = MultiRouteCriterion(3, RouteMatcher.for_routes(ROUTES))
    criterion(preds, targets)["loss"].backward()
    new = _aux_only(model)
    assert new and all(p.grad is not None and p.grad.abs().sum() > 0 for p in new.values())
    layer = next(m for m in model.modules() if "mrdetr_routes" in m._modules).layers[0]
    fc1 = layer.mlp.fc1 if hasattr(layer, "mlp") else layer.fc1  # transformers 5.x / 4.57
    for p in (layer.self_attn.q_proj.weight, layer.encoder_attn.value_proj.weight,
              fc1.weight, layer.final_layer_norm.weight):  # fmt: skip
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_primary_loss_leaves_auxiliary_parameters_without_gradient():
    model = _wrapped(hf_deformable_detr, with_box_refine=True, two_stage=True)
    pixels, targets = random_detection_batch()
    out = model(pixels)
    preds = adapters.hf_route_predictions(model, adapters.route_outputs(model), out)
    criterion = MultiRouteCriterion(3, RouteMatcher.for_routes(ROUTES))
    criterion({"primary": preds["primary"]}, targets)["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in _aux_only(model).values())
    assert model.model.decoder.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("builder", ["deformable", "rt_detr"])
def test_unwrap_save_pretrained_from_pretrained_round_trip(builder, tmp_path):
    make = {"deformable": lambda: hf_deformable_detr(with_box_refine=True, two_stage=True),
            "rt_detr": hf_rt_detr}[builder]  # fmt: skip
    save_kwargs = save_pretrained_kwargs(make, tmp_path / "plain")
    model = make()
    keys = list(model.state_dict())
    adapters.wrap(model, ROUTES)
    assert len(model.state_dict()) > len(keys)
    pixels, targets = random_detection_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(pixels)
    preds = adapters.hf_route_predictions(model, adapters.route_outputs(model), out)
    MultiRouteCriterion(3, RouteMatcher.for_routes(ROUTES))(preds, targets)["loss"].backward()
    opt.step()
    adapters.unwrap(model)
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "unwrapped", **save_kwargs)
    loaded = type(model).from_pretrained(tmp_path / "unwrapped")
    assert list(loaded.state_dict()) == keys
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, model(pixels).logits)


def _tensors(x):
    if isinstance(x, torch.Tensor) or x is None:
        return [x]
    return [t for v in (x.values() if isinstance(x, dict) else x) for t in _tensors(v)]


@pytest.mark.parametrize("builder", ["deformable", "rt_detr"])
def test_return_dict_false_and_hidden_states_equal_unwrapped(builder):
    """A tuple when the caller asks for one (transformers 4.57's decoders take return_dict and
    return a tuple themselves), with every layer's states: the unwrapped model's, entry by entry."""
    make = {"deformable": lambda: _wrapped(hf_deformable_detr, with_box_refine=True),
            "rt_detr": lambda: _wrapped(hf_rt_detr)}[builder]  # fmt: skip
    model = make()
    plain = route_copy(model, 0)
    pixels, _ = random_detection_batch()
    got = model(pixels, return_dict=False, output_hidden_states=True)
    assert adapters.route_outputs(model).hidden_states.shape[1] == len(ROUTES)
    want = plain(pixels, return_dict=False, output_hidden_states=True)
    assert isinstance(got, tuple) and len(got) == len(want)
    got, want = _tensors(got), _tensors(want)
    assert len(got) == len(want) > model.config.decoder_layers  # the layers' states are in it
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # None (4.57's tuples) == None


def test_bare_decoder_and_deepcopy():
    model = hf_deformable_detr(with_box_refine=True)
    plain = copy.deepcopy(model)
    adapters.wrap(model.model.decoder, ROUTES)  # the bare decoder
    clone = copy.deepcopy(model)
    pixels, _ = random_detection_batch()
    for m in (model, clone):
        out = m(pixels)
        assert adapters.route_outputs(m).hidden_states.shape[1] == len(ROUTES)
        torch.testing.assert_close(out.logits, plain(pixels).logits, rtol=1e-5, atol=1e-6)


def test_fast_attention_and_routes_together():
    model = _wrapped(hf_deformable_detr, with_box_refine=True)
    pixels, _ = random_detection_batch()
    ref = model(pixels).logits
    ref_outs = adapters.route_outputs(model).hidden_states
    adapters.use_fast_deformable_attention(model, backend="cpu")
    torch.testing.assert_close(model(pixels).logits, ref, rtol=1e-4, atol=1e-5)
    got = adapters.route_outputs(model).hidden_states
    torch.testing.assert_close(got, ref_outs, rtol=1e-4, atol=1e-5)


def test_hf_route_predictions_rejects_other_models():
    model = _wrapped(hf_deformable_detr)
    model(random_detection_batch()[0])
    with pytest.raises(TypeError, match="DeformableDetrForObjectDetection or"):
        adapters.hf_route_predictions(torch.nn.Linear(2, 2), adapters.route_outputs(model))


def test_builder_resnet50_backbone_and_its_errors():
    model = hf_deformable_detr(backbone="resnet50")
    cfg = model.config.backbone_config
    assert (cfg.layer_type, list(cfg.depths), list(cfg.hidden_sizes)) == (
        "bottleneck",
        [3, 4, 6, 3],
        [256, 512, 1024, 2048],
    )
    pixels, _ = random_detection_batch(batch=2, image_size=128, num_labels=3)
    with torch.no_grad():
        assert model.eval()(pixels).logits.shape == (2, 10, 3)
    with pytest.raises(ValueError, match="backbone must be 'basic' or 'resnet50', got 'r18'"):
        hf_deformable_detr(backbone="r18")
    with pytest.raises(ValueError, match="backbone_width=32"):
        hf_deformable_detr(backbone="resnet50", backbone_width=32)
