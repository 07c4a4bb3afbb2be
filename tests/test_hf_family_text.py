"""HF Grounding DINO and MM Grounding DINO (text-conditioned): the checks every family passes
(tests/_hf_family_checks.py) and the text-specific ones.

Oracles: the unwrapped model; transformers' own Grounding DINO loss with its Hungarian matcher;
each auxiliary route run alone through a plain copy of the model with that route's modules
swapped in (the instruction tokens written out through the host's query/key/value/out_proj).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from _hf_family_checks import (  # noqa: E402
    ROUTES,
)
from _hf_oracle import owned_by_layer, randomise, swap_owned  # noqa: E402
from _hf_text_oracle import InstructQKVAttention  # noqa: E402
from _threads import intra_op_threads  # noqa: E402

from mrdetr import adapters  # noqa: E402
from mrdetr.adapters.host_loss import host_auxiliary_loss, host_route_loss  # noqa: E402
from mrdetr.testing.hf_families import family_available, tiny_batch, tiny_model  # noqa: E402

FAMILIES = [
    pytest.param(f, marks=pytest.mark.skipif(not family_available(f), reason=f"no {f}"))
    for f in ("grounding_dino", "mm_grounding_dino")
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with intra_op_threads(1):
        yield


def _route_copy(wrapped, index: int):
    """A plain copy of ``wrapped`` running route ``index`` alone."""
    model, layers = owned_by_layer(wrapped, index)
    swap_owned(
        layers,
        "self_attn_layer_norm",
        ("fc1", "fc2"),
        lambda attn, own: InstructQKVAttention(attn, own.tokens, own.tokens_pos),
    )
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_route_equals_its_own_pass_on_the_same_text(family):
    model = tiny_model(family)
    adapters.wrap(model, ROUTES)
    randomise(model)  # the routes' copies start equal to the host's modules
    batch = tiny_batch(model)
    batch.pop("labels")
    out = model(**batch)
    outs = adapters.route_outputs(model)
    assert outs.context["text_hidden_states"].shape[:2] == batch["input_ids"].shape
    preds = adapters.hf_route_predictions(model, outs, out)
    # the primary route's predictions are the detector's own, bit for bit
    assert torch.equal(preds["primary"]["pred_logits"], out.logits)
    assert torch.equal(preds["primary"]["pred_boxes"], out.pred_boxes)
    for i, route in enumerate(ROUTES):
        want = _route_copy(model, i)(**batch)
        got = outs.hidden_states[:, i].transpose(0, 1)  # [B, N, Q, C]
        torch.testing.assert_close(got, want.intermediate_hidden_states, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(
            preds[route.name]["pred_logits"], want.logits, atol=2e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            preds[route.name]["pred_boxes"], want.pred_boxes, atol=2e-5, rtol=1e-4
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_host_loss_reproduces_transformers_and_trains_every_route(family):
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    adapters.wrap(model, ROUTES)
    batch = tiny_batch(model)
    out, want = model(**batch), plain(**batch)
    preds = adapters.hf_route_predictions(model, adapters.route_outputs(model), out)
    # the family table calls transformers' own loss exactly as the detector does
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher

    c = model.config
    hungarian = GroundingDinoHungarianMatcher(
        class_cost=c.class_cost, bbox_cost=c.bbox_cost, giou_cost=c.giou_cost
    )
    loss, terms = host_route_loss(model, preds["primary"], batch["labels"], hungarian)
    torch.testing.assert_close(loss, want.loss)
    assert terms.keys() == want.loss_dict.keys()
    # auxiliary routes: one-to-many over the phrases, every added parameter reached
    aux = {name: p for name, p in preds.items() if name != "primary"}
    aux_loss, aux_terms = host_auxiliary_loss(model, aux, batch["labels"])
    for name in aux:
        assert f"{name}/loss_ce" in aux_terms and f"{name}/loss_giou_0" in aux_terms
        assert not any(k.startswith(name) and k.endswith("_enc") for k in aux_terms)
    assert torch.isfinite(aux_loss)
    # the wrapped detector's own loss adds exactly these terms (default weights 1)
    assert out.loss_dict.keys() == want.loss_dict.keys() | aux_terms.keys()
    torch.testing.assert_close(out.loss, want.loss + aux_loss)
    aux_loss.backward()
    for name, p in model.model.decoder.mrdetr_routes.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_text_cross_attention_is_restored_after_the_pass(family):
    model = tiny_model(family)
    adapters.wrap(model, ROUTES)
    batch = tiny_batch(model)
    model(**batch)
    for layer in model.model.decoder.layers:
        assert "forward" not in layer.encoder_attn_text.__dict__
    with pytest.raises(ValueError, match="text_encoder_hidden_states"):
        decoder = model.model.decoder
        decoder(
            inputs_embeds=torch.zeros(1, 8, 32), vision_encoder_hidden_states=torch.zeros(1, 4, 32),
            reference_points=torch.rand(1, 8, 4),
        )  # fmt: skip
