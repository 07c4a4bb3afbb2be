"""HF OmDet-Turbo: no training loss in transformers (``labels=`` raises), so the family checks
are adapted: eval bitwise; a training pass gives the unwrapped model's outputs bit for bit;
``route_outputs`` carries every route for the user's own loss, which reaches every added
parameter (the primary outputs reach none); unwrap + save/from_pretrained round trip.

Oracles: the unwrapped model; each route run alone through a plain copy of the model with that
route's modules swapped in (its own task tokens through the layers; the instruction tokens
written out through the host's query/key/value/out_proj).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from _hf_family_checks import ROUTES, check_eval_bitwise  # noqa: E402
from _hf_oracle import owned_by_layer, randomise, swap_owned  # noqa: E402
from _hf_text_oracle import InstructQKVAttention  # noqa: E402
from _threads import intra_op_threads  # noqa: E402

from mrdetr import adapters  # noqa: E402
from mrdetr.testing.hf_families import family_available, tiny_batch, tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not family_available("omdet_turbo"), reason="no omdet_turbo")
FIELDS = ("decoder_coord_logits", "decoder_class_logits", "encoder_coord_logits")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with intra_op_threads(1):
        yield


def _pair():
    model = tiny_model("omdet_turbo")
    plain = copy.deepcopy(model)
    adapters.wrap(model, ROUTES)
    return model, plain


def _decoder(model):
    return next(m for m in model.modules() if type(m).__name__ == "OmDetTurboDecoder")


def _added(model) -> dict:
    return dict(_decoder(model).mrdetr_routes.named_parameters())


def _clear_text_caches(model) -> None:
    """OmDet-Turbo caches its class / task text embeddings by token ids (in training too, with
    their autograd graph): empty the caches so that a copy or a loaded model is compared on
    freshly computed text features."""
    for name in ("language_cache_class", "language_cache_prompt"):
        cache = getattr(model, name)
        setattr(model, name, type(cache)(cache.capacity))


def test_wrap_finds_the_decoder_and_eval_is_bitwise():
    model, _ = _pair()
    assert adapters.is_wrapped(model)
    assert hasattr(_decoder(model), "mrdetr_routes")
    check_eval_bitwise("omdet_turbo")


def test_train_pass_gives_the_unwrapped_outputs():
    model, plain = _pair()
    batch = tiny_batch(model)
    got, want = model(**batch), plain(**batch)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
    assert not torch.is_grad_enabled() or got.decoder_class_logits.requires_grad


def test_route_outputs_train_every_added_parameter():
    model, _ = _pair()
    batch = tiny_batch(model)
    out = model(**batch)
    outs = adapters.route_outputs(model)
    n, r, b, q = 2, len(ROUTES), 2, model.config.num_queries
    assert outs.hidden_states.shape == (n, r, b, q, model.config.decoder_hidden_dim)
    assert outs.boxes.shape == (n, r, b, q, 4)
    assert set(outs.outputs) == {r.name for r in ROUTES[1:]}
    # the primary route's last layer is the detector's own prediction
    assert torch.equal(outs.boxes[-1, 0], out.decoder_coord_logits)
    # a user's loss on the auxiliary routes' outputs reaches every parameter they added
    loss = sum(o.decoder_classes.sum() + o.decoder_coords.sum() for o in outs.outputs.values())
    loss.backward()
    for name, p in _added(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the primary route's outputs never reach them
    model.zero_grad()
    _clear_text_caches(model)  # the cached text features' graph was freed by backward
    out = model(**batch)
    (out.decoder_class_logits.sum() + out.decoder_coord_logits.sum()).backward()
    assert all(p.grad is None or not p.grad.any() for p in _added(model).values())


def test_labels_still_raise_as_in_transformers():
    model, _ = _pair()
    with pytest.raises(NotImplementedError):
        model(**tiny_batch(model), labels=[{}])


def _route_copy(wrapped, index: int):
    """A plain copy of ``wrapped`` running route ``index`` alone."""
    _clear_text_caches(wrapped)
    model, layers = owned_by_layer(wrapped, index)
    swap_owned(
        layers,
        "norm1",
        ("linear1", "linear2"),
        lambda attn, own: InstructQKVAttention(attn, own.tokens, own.tokens_pos),
    )
    return model


def test_every_route_equals_its_own_pass_with_its_own_task_tokens():
    model = tiny_model("omdet_turbo")
    adapters.wrap(model, ROUTES)
    randomise(model)  # the routes' copies start equal to the host's modules
    batch = tiny_batch(model)
    batch["tasks_attention_mask"][1, -2:] = 0  # padded task tokens: the fusion mask matters
    model(**batch)
    outs = adapters.route_outputs(model)
    for i, route in enumerate(ROUTES):
        want = _route_copy(model, i)(**batch)
        got_boxes, got_classes = outs.boxes[-1, i], None
        if i:
            got_classes = outs.outputs[route.name].decoder_classes[-1]
        torch.testing.assert_close(got_boxes, want.decoder_coord_logits, atol=2e-5, rtol=1e-4)
        if got_classes is not None:
            torch.testing.assert_close(got_classes, want.decoder_class_logits, atol=2e-4, rtol=1e-4)


def test_round_trip(tmp_path):
    model = tiny_model("omdet_turbo")
    keys = list(model.state_dict())
    adapters.wrap(model, ROUTES)
    batch = tiny_batch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**batch)
    outs = adapters.route_outputs(model)
    sum(o.decoder_classes.sum() for o in outs.outputs.values()).backward()
    opt.step()
    adapters.unwrap(model)
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert list(loaded.state_dict()) == keys
    _clear_text_caches(model)  # its cached text features predate the step
    model.eval(), loaded.eval()
    with torch.no_grad():
        got, want = loaded(**batch), model(**batch)
    for key in FIELDS:
        assert torch.equal(got[key], want[key]), key
