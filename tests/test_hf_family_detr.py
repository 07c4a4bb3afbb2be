"""DETR and Table Transformer (transformers 4.57 and 5.x) under mrdetr's routes: the checks every
HF family passes (tests/_hf_family_checks.py), plus the route hidden states against the
decoder's own final norm and each auxiliary route against its own plain pass."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import _hf_family_checks  # noqa: E402
from _hf_oracle import randomise, route_copy  # noqa: E402
from _threads import intra_op_threads  # noqa: E402

from mrdetr import adapters, routes  # noqa: E402
from mrdetr.adapters.host_loss import host_route_loss  # noqa: E402
from mrdetr.testing.hf_families import family_available, tiny_batch, tiny_model  # noqa: E402


def _param(family, *values, id=None):
    skip = pytest.mark.skipif(not family_available(family), reason=f"no {family}")
    return pytest.param(family, *values, marks=skip, id=id or family)


FAMILIES = [_param(f) for f in ("detr", "table_transformer")]
ROUTES = routes.mr_detr(num_instruction_tokens=3)


@pytest.fixture(autouse=True)
def _one_thread():
    with intra_op_threads(1):
        yield


_ZERO = "aux.0.aux_instruct.self_attn_norm.weight"  # see _hf_family_checks.ZERO_GRAD


@pytest.mark.skipif(not family_available("table_transformer"), reason="no table_transformer")
def test_table_transformer_first_prenorm_weight_has_zero_gradient_as_the_host():
    """Table Transformer's decoder is pre-norm and its queries enter as zeros: the first layer's
    ``self_attn_layer_norm`` normalises zeros to zeros, so its weight's gradient is exactly 0,
    for the host's own norm as for the instruction route's copy (its bias still learns)."""
    model = tiny_model("table_transformer")
    plain = copy.deepcopy(model)
    adapters.wrap(model, ROUTES)
    batch = tiny_batch(model)
    model(**batch).loss.backward()
    plain(**batch).loss.backward()
    params = _hf_family_checks._added(model)
    assert params[_ZERO].grad is not None and not params[_ZERO].grad.any()
    assert params[_ZERO.replace("weight", "bias")].grad.any()
    host = plain.model.decoder.layers[0].self_attn_layer_norm
    assert not host.weight.grad.any() and host.bias.grad.any()


def _wrapped(family, encoder_heads=None):
    model = tiny_model(family)
    if encoder_heads is not None:  # decoder heads differ from config.num_attention_heads
        model.config.encoder_attention_heads = encoder_heads
        torch.manual_seed(0)
        model = type(model)(model.config)
        assert model.config.decoder_attention_heads != encoder_heads
    adapters.wrap(model, ROUTES)
    randomise(model)  # no two routes coincide
    return model


@pytest.mark.parametrize(
    ("family", "encoder_heads"),
    [_param("detr", None), _param("table_transformer", None), _param("detr", 4, id="detr-heads")],
)
def test_routes_equal_route_by_route_oracle(family, encoder_heads):
    """Each route's hidden states (through ``decoder.layernorm``) and predictions equal a plain
    pass of the unwrapped model with that route's modules swapped in (the instruction route's
    attention written out through the host's own q/k/v/out projections, with the decoder's
    head count); the primary route's are the model's own, bit for bit."""
    model = _wrapped(family, encoder_heads)
    batch = tiny_batch(model)
    out = model(**batch)
    outs = adapters.route_outputs(model)
    preds = adapters.hf_route_predictions(model, outs, out)
    assert list(preds) == [r.name for r in ROUTES]
    num_labels = model.config.num_labels
    close = dict(rtol=1e-4, atol=1e-5)
    total = None
    for i, route in enumerate(ROUTES):
        expected = route_copy(model, i)(**batch)
        got = preds[route.name]
        assert got["pred_logits"].shape[-1] == num_labels + 1  # softmax with no-object
        torch.testing.assert_close(outs.hidden_states[-1, i], expected.last_hidden_state, **close)
        torch.testing.assert_close(got["pred_logits"], expected.logits, **close)
        torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, **close)
        (aux,) = got["aux_outputs"]  # two decoder layers
        (want_aux,) = expected.auxiliary_outputs
        torch.testing.assert_close(aux["pred_logits"], want_aux["logits"], **close)
        torch.testing.assert_close(aux["pred_boxes"], want_aux["pred_boxes"], **close)
        if i == 0:
            assert torch.equal(got["pred_logits"], out.logits)
            assert torch.equal(got["pred_boxes"], out.pred_boxes)
            assert torch.equal(outs.hidden_states[-1, 0], out.last_hidden_state)
            assert torch.equal(aux["pred_logits"], out.auxiliary_outputs[0]["logits"])
            for key, value in expected.loss_dict.items():  # the host's own terms, untouched
                assert torch.equal(out.loss_dict[key], value), key
            total = expected.loss
        else:  # the route's loss: the family's loss on the oracle's predictions
            oracle_preds = {
                "pred_logits": expected.logits,
                "pred_boxes": expected.pred_boxes,
                "aux_outputs": [
                    {"pred_logits": a["logits"], "pred_boxes": a["pred_boxes"]}
                    for a in expected.auxiliary_outputs
                ],
            }
            loss, terms = host_route_loss(model, oracle_preds, batch["labels"])
            for key, value in terms.items():
                torch.testing.assert_close(out.loss_dict[f"{route.name}/{key}"], value, **close)
            total = total + loss
    torch.testing.assert_close(out.loss, total, **close)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_finds_the_decoder_and_refuses_a_query_padding_mask(family):
    """A per-query ``decoder_attention_mask`` that reaches the decoder (DETR in transformers
    5.x) is refused in training; where the host ignores it (4.57, Table Transformer) so does
    the wrapped model."""
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    adapters.wrap(model, ROUTES)
    state = model.model.decoder.mrdetr_routes
    assert isinstance(state.integration, adapters.hf.HFDetrIntegration)
    assert state.integration.detector_class == type(model).__name__
    batch = tiny_batch(model)
    batch.pop("labels")
    mask = torch.ones(batch["pixel_values"].shape[0], model.config.num_queries, dtype=torch.long)
    mask[:, 1::2] = 0
    with torch.no_grad():
        used = not torch.equal(
            plain(**batch, decoder_attention_mask=mask).logits, plain(**batch).logits
        )
    if used:
        with pytest.raises(ValueError, match="attention_mask"):
            model(**batch, decoder_attention_mask=mask)
    else:
        got = model(**batch, decoder_attention_mask=mask).logits
        assert torch.equal(got, model(**batch).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_auxiliary_loss_routes_use_the_last_layer(family):
    """``config.auxiliary_loss = False``: no in-loop norm, the host's loss (and each route's)
    on the last layer only, which is the decoder's own ``last_hidden_state``."""
    model = tiny_model(family)
    model.config.auxiliary_loss = False
    plain = copy.deepcopy(model)
    adapters.wrap(model, ROUTES)
    batch = tiny_batch(model)
    out, want = model(**batch), plain(**batch)
    hidden = adapters.route_outputs(model).hidden_states
    assert torch.equal(hidden[-1, 0], out.last_hidden_state)
    assert torch.equal(out.logits, want.logits)
    assert {k for k in out.loss_dict if "/" not in k} == set(want.loss_dict)
    assert "aux_ffn/loss_ce" in out.loss_dict and "aux_ffn/loss_ce_0" not in out.loss_dict
