"""mrdetr.adapters on the original Deformable-DETR decoder (interface of
tests/_deformable_detr_fixture.py): eval is the original, packed routes equal an unpacked
per-route oracle, the return convention and box refinement are kept, unwrap restores the keys."""

from __future__ import annotations

import copy

import pytest
import torch
from _adapter_oracle import randomise, route_copy
from _deformable_detr_fixture import expected_outputs, make_decoder, make_inputs
from torch import nn

from mrdetr import MultiRouteCriterion, RouteMatcher, adapters, routes
from mrdetr.adapters import DeformableDetrIntegration
from mrdetr.layers import inverse_sigmoid

ROUTES = routes.mr_detr(num_instruction_tokens=3)
CASES = {  # (box refinement, 4-d input boxes)
    "points": (False, False),
    "refine_points": (True, False),  # 2-d points for layer 0, 4-d boxes afterwards
    "refine_boxes": (True, True),  # two-stage style
}


class Detector(nn.Module):
    """The original detector's layout: ``transformer.decoder`` plus per-layer heads."""

    def __init__(self, decoder, classes=3):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.decoder = decoder
        dim, n = decoder.layers[0].linear1.in_features, decoder.num_layers
        self.class_embed = nn.ModuleList(nn.Linear(dim, classes) for _ in range(n))
        self.bbox_embed = decoder.bbox_embed or nn.ModuleList(nn.Linear(dim, 4) for _ in range(n))


def _boxes(detector, init_ref, hidden, refs):
    """Deformable-DETR's per-layer boxes: layer 0 from the input reference, layer i from the
    reference layer i-1 produced; 2-d references shift the centre only."""
    out = []
    for i in range(hidden.shape[0]):
        ref = inverse_sigmoid(init_ref if i == 0 else refs[i - 1])
        delta = detector.bbox_embed[i](hidden[i])
        if ref.shape[-1] == 4:
            delta = delta + ref
        else:
            delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)
        out.append(delta.sigmoid())
    return out


def _wrapped(case):
    refine, boxes = CASES[case]
    detector = Detector(make_decoder(num_layers=3, box_refine=refine))
    adapters.wrap(detector, ROUTES)
    randomise(detector.transformer.decoder, scale=0.05)
    return detector, make_inputs(boxes=boxes)


@pytest.mark.parametrize("case", list(CASES))
def test_routes_equal_unpacked_oracle_and_eval_is_the_original(case):
    detector, inputs = _wrapped(case)
    decoder = detector.transformer.decoder
    hidden, refs = expected_outputs(decoder, inputs)  # train: packed, primary returned
    outs = adapters.route_outputs(detector)
    preds = adapters.route_predictions(outs, detector.class_embed, detector.bbox_embed)
    for i, route in enumerate(ROUTES):
        oracle = route_copy(detector, "transformer.decoder", DeformableDetrIntegration(), i)
        exp_hidden, exp_refs = expected_outputs(oracle.transformer.decoder, inputs)
        if i == 0:  # the decoder's own return value is the primary route's
            torch.testing.assert_close(hidden, exp_hidden, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(refs, exp_refs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs.hidden_states[:, i], exp_hidden, rtol=1e-5, atol=1e-5)
        exp_boxes = _boxes(oracle, inputs[1], exp_hidden, exp_refs)
        got = [*preds[route.name]["aux_outputs"], preds[route.name]]
        for layer, (g, e) in enumerate(zip(got, exp_boxes, strict=True)):
            torch.testing.assert_close(g["pred_boxes"], e, rtol=1e-5, atol=1e-5, msg=str(layer))
    plain = route_copy(detector, "transformer.decoder", DeformableDetrIntegration(), 0)
    detector.eval(), plain.eval()
    with torch.no_grad():
        got = expected_outputs(decoder, inputs)
        exp = expected_outputs(plain.transformer.decoder, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, exp, strict=True))


def test_gradients_and_primary_only_loss():
    detector, inputs = _wrapped("refine_points")
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3],
                                                                [0.7, 0.3, 0.1, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]  # fmt: skip
    criterion = MultiRouteCriterion(3, RouteMatcher.for_routes(ROUTES))
    decoder = detector.transformer.decoder
    new = dict(decoder.mrdetr_routes.named_parameters())
    for primary_only in (True, False):
        detector.zero_grad(set_to_none=True)
        expected_outputs(decoder, inputs)
        preds = adapters.route_predictions(
            adapters.route_outputs(detector), detector.class_embed, detector.bbox_embed
        )
        if primary_only:
            preds = {"primary": preds["primary"]}
        criterion(preds, targets)["loss"].backward()
        for name, p in new.items():
            if primary_only:
                assert p.grad is None or not p.grad.any(), name
            else:
                assert p.grad is not None and p.grad.any(), name
        for p in (decoder.layers[1].self_attn.in_proj_weight, decoder.layers[1].norm1.weight,
                  decoder.layers[1].cross_attn.value_proj.weight):  # fmt: skip
            assert p.grad is not None and p.grad.any()


def test_not_intermediate_and_unwrap_restores_the_keys():
    decoder = make_decoder(num_layers=2, box_refine=True)
    decoder.return_intermediate = False
    keys = list(decoder.state_dict())
    plain = copy.deepcopy(decoder)
    adapters.wrap(decoder, ROUTES)
    inputs = make_inputs()
    out, ref = expected_outputs(decoder, inputs)
    exp_out, exp_ref = expected_outputs(plain, inputs)
    torch.testing.assert_close(out, exp_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, exp_ref, rtol=1e-5, atol=1e-5)
    assert adapters.route_outputs(decoder).hidden_states.shape[:2] == (2, 3)
    assert len(decoder.state_dict()) > len(keys)
    adapters.unwrap(decoder)
    assert list(decoder.state_dict()) == keys


def test_a_decoder_without_the_original_layer_parts_is_not_recognised():
    decoder = make_decoder(num_layers=1)
    del decoder.layers[0].norm3
    assert DeformableDetrIntegration().find_decoder(decoder) is None
    assert DeformableDetrIntegration().find_decoder(Detector(make_decoder())) is not None
