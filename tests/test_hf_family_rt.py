"""The RT-DETR family group of HF transformers: ``rt_detr_v2``, ``d_fine``, ``deimv2`` (RT-DETR
itself: tests/test_adapters_hf.py), on tiny random models (mrdetr.testing.hf_families).

Oracles: the unwrapped model (the common checks of tests/_hf_family_checks.py), each route run
alone through a plain copy of the model with that route's modules swapped in
(tests/_hf_oracle.py), and transformers' own loss function called on the model's own outputs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import _hf_family_checks as checks  # noqa: E402
from _hf_oracle import randomise, route_copy  # noqa: E402
from _threads import intra_op_threads  # noqa: E402

from mrdetr import adapters  # noqa: E402
from mrdetr.adapters.host_loss import host_auxiliary_loss, host_route_loss  # noqa: E402
from mrdetr.testing.hf_families import family_available, tiny_batch, tiny_model  # noqa: E402

FAMILIES = ("rt_detr_v2", "d_fine", "deimv2")
CORNERS = ("d_fine", "deimv2")  # boxes through corner distributions (FDR)
DECODERS = {"rt_detr_v2": "RTDetrV2Decoder", "d_fine": "DFineDecoder", "deimv2": "Deimv2Decoder"}
# the classification term of each family's own loss (VFL / MAL) and D-FINE's box terms
CLASS_TERM = {"rt_detr_v2": "loss_vfl", "d_fine": "loss_vfl", "deimv2": "loss_mal"}
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with intra_op_threads(1):
        yield


def _transformers_major() -> int:
    return int(__import__("transformers").__version__.split(".")[0])


def _available(family):
    if not family_available(family):
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {family}")


def _wrapped(family, primary_loss_only: bool = False):
    """The wrapped tiny model; ``primary_loss_only``: its ``loss`` is the host's own (every
    auxiliary route weight 0), as the unwrapped model's."""
    _available(family)
    model = tiny_model(family)
    weights = dict.fromkeys(checks.AUX, 0.0) if primary_loss_only else None
    adapters.wrap(model, checks.ROUTES, route_weights=weights)
    randomise(model)  # the routes' copies start equal to the primary's modules
    return model


def _aux_params(model) -> dict:
    return dict(model.model.decoder.mrdetr_routes.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_detected_by_its_own_integration(family):
    model = _wrapped(family)
    decoder = model.model.decoder
    assert type(decoder).__name__ == DECODERS[family]
    assert decoder.mrdetr_routes.integration.decoder_class == DECODERS[family]


# --- family-specific ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_routes_equal_route_by_route_oracle(family):
    """Each auxiliary route's predictions equal a plain pass of a model copy running that route
    alone (no denoising there: the routes never hold denoising queries); D-FINE / DEIMv2 also
    their corner distributions and the pre-box-head prediction."""
    model = _wrapped(family)
    batch = tiny_batch(model)
    out = model(**batch)
    preds = adapters.hf_route_predictions(model, adapters.route_outputs(model), out)
    pixels = batch["pixel_values"]
    for i, route in enumerate(checks.ROUTES[1:], start=1):
        want = route_copy(model, i)(pixel_values=pixels)  # training mode, no labels
        got = preds[route.name]
        torch.testing.assert_close(got["pred_logits"], want.logits, **TOL)
        torch.testing.assert_close(got["pred_boxes"], want.pred_boxes, **TOL)
        layers = [*got["aux_outputs"], got]
        close = torch.testing.assert_close
        if family in CORNERS:  # intermediate_*: [B, N + 1 (pre-box head first), Q, ...]
            close(got["pre_outputs"]["pred_logits"], want.intermediate_logits[:, 0], **TOL)
            close(got["pre_outputs"]["pred_boxes"], want.intermediate_reference_points[:, 0], **TOL)
            for n, layer in enumerate(layers):
                close(layer["pred_logits"], want.intermediate_logits[:, n + 1], **TOL)
                close(layer["pred_corners"], want.intermediate_predicted_corners[:, n], **TOL)
                close(layer["ref_points"], want.initial_reference_points[:, n], **TOL)
        else:
            for n, layer in enumerate(layers):
                close(layer["pred_logits"], want.intermediate_logits[:, n], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_denoising_stays_primary_and_never_sees_routes(family):
    """The primary route equals the unwrapped model bit for bit, denoising queries included;
    changing every parameter the routes added changes nothing there; the routes' predictions
    hold the matching queries only."""
    model = _wrapped(family, primary_loss_only=True)
    plain = route_copy(model, 0)
    batch = tiny_batch(model)
    torch.manual_seed(3)  # denoising queries are drawn at random
    got = model(**batch)
    preds = adapters.hf_route_predictions(model, adapters.route_outputs(model), got)
    torch.manual_seed(3)
    want = plain(**batch)
    dn = want.denoising_meta_values["dn_num_split"][0]
    assert dn > 0 and got.logits.shape[1] == dn + model.config.num_queries
    for key in ("logits", "pred_boxes", "intermediate_logits", "intermediate_reference_points"):
        assert torch.equal(getattr(got, key), getattr(want, key)), key
    if family in CORNERS:
        assert torch.equal(got.initial_reference_points, want.initial_reference_points)
        corners = got.intermediate_predicted_corners
        assert torch.equal(corners, want.intermediate_predicted_corners)
    assert torch.equal(got.loss, want.loss)
    for route in preds.values():
        assert route["pred_logits"].shape[1] == model.config.num_queries
    with torch.no_grad():
        for p in _aux_params(model).values():
            p.add_(torch.randn_like(p))
    torch.manual_seed(3)
    again = model(**batch)
    assert torch.equal(again.intermediate_logits, got.intermediate_logits)


def _own_call(model, out, labels) -> dict:
    """transformers' loss function called directly on the model's outputs with the denoising
    queries cut off (how a route without denoising queries is supervised): its loss_dict."""
    dn = out.denoising_meta_values["dn_num_split"][0]
    extra = {}
    if getattr(out, "intermediate_predicted_corners", None) is not None:
        extra = {
            "predicted_corners": out.intermediate_predicted_corners[:, :, dn:],
            "initial_reference_points": out.initial_reference_points[:, :, dn:],
        }
    return model.loss_function(
        out.logits[:, dn:], labels, out.logits.device, out.pred_boxes[:, dn:],
        model.config, out.intermediate_logits[:, :, dn:],
        out.intermediate_reference_points[:, :, dn:], enc_topk_logits=out.enc_topk_logits,
        enc_topk_bboxes=out.enc_topk_bboxes, **extra,
    )[1]  # fmt: skip


def _corner_terms_without_denoising(family, want: dict) -> bool:
    """Whether the family's loss gives FGL / DDF to a call without denoising queries: 5.x
    does; transformers 4.57's D-FINE loss computes its per-layer, encoder, FGL and DDF terms
    only in a call with denoising queries (the last layer's VFL, L1 and GIoU otherwise)."""
    return family in CORNERS and "loss_fgl_aux_0" in want


@pytest.mark.parametrize("family", FAMILIES)
def test_primary_predictions_under_the_family_loss_equal_its_own_call(family):
    """The primary route's predictions, given to the family's own loss with its own Hungarian
    matcher through host_route_loss, give the loss transformers computes when called directly on
    the model's outputs with the denoising queries cut off (the host's loss function, its
    layer stacking, its encoder proposals: VFL / MAL, FGL and DDF terms included)."""
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

    model = _wrapped(family)
    batch = tiny_batch(model)
    out = model(**batch)
    preds = adapters.hf_route_predictions(model, adapters.route_outputs(model), out)
    want = _own_call(model, out, batch["labels"])
    matcher = RTDetrHungarianMatcher(model.config)
    _, got = host_route_loss(model, preds["primary"], batch["labels"], matcher)
    assert got.keys() == want.keys()
    assert CLASS_TERM[family] in got
    if family == "deimv2" or (family == "d_fine" and _transformers_major() >= 5):
        assert _corner_terms_without_denoising(family, want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_auxiliary_routes_trained_by_the_family_loss(family):
    """host_auxiliary_loss on the routes' predictions: every auxiliary route's own terms (VFL /
    MAL; FGL + DDF for the corner families), gradients on every parameter the routes added; the
    model's own (primary) loss reaches none of them."""
    model = _wrapped(family, primary_loss_only=True)
    batch = tiny_batch(model)
    out = model(**batch)
    preds = adapters.hf_route_predictions(model, adapters.route_outputs(model), out)
    aux = {name: p for name, p in preds.items() if name != "primary"}
    loss, terms = host_auxiliary_loss(model, aux, batch["labels"])
    corners = _corner_terms_without_denoising(family, _own_call(model, out, batch["labels"]))
    for route in checks.AUX:
        assert f"{route}/{CLASS_TERM[family]}" in terms
        if corners:
            assert f"{route}/loss_fgl_aux_0" in terms and f"{route}/loss_ddf_aux_0" in terms
    assert torch.isfinite(loss)
    out.loss.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in _aux_params(model).values())
    loss.backward()
    for name, p in _aux_params(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deimv2_route_ffn_copies_the_whole_swiglu_module():
    """DEIMv2's FFN is a SwiGLU module (gate/up/down projections) and its norms RMSNorm: a
    route owning the FFN holds a full copy of the module, the instruction route its own RMSNorm."""
    model = _wrapped("deimv2")
    layer = model.model.decoder.layers[0]
    owned = model.model.decoder.mrdetr_routes.aux[0]
    ffn_owner = next(m for m in owned.values() if hasattr(m, "ffn"))
    (copy_,) = ffn_owner.ffn
    assert type(copy_) is type(layer.mlp) and copy_ is not layer.mlp
    assert set(dict(copy_.named_parameters())) == set(dict(layer.mlp.named_parameters()))
    norm_owner = next(m for m in owned.values() if hasattr(m, "self_attn_norm"))
    assert type(norm_owner.self_attn_norm) is type(layer.self_attn_layer_norm)
    assert norm_owner.self_attn_norm is not layer.self_attn_layer_norm


def test_d_fine_initial_reference_points_sliced_per_route():
    """``initial_reference_points`` (``[B, N, L, 4]``) is cut per route along the query axis
    like the ``intermediate_*`` fields, so the primary output keeps the host's shapes."""
    model = _wrapped("d_fine")
    batch = tiny_batch(model)
    out = model(**batch)
    length = out.logits.shape[1]
    assert out.initial_reference_points.shape[2] == length
    q = model.config.num_queries
    for part in adapters.route_outputs(model).outputs.values():
        assert part.initial_reference_points.shape[2] == q
        assert part.intermediate_logits.shape[2] == q
    assert torch.isfinite(out.loss)  # the host's loss on the primary's shapes
