"""The checks every HF DETR family's integration must pass (one test file per family group
calls them): oracles are the unwrapped model (a deep copy taken before ``wrap``) and the
detector's own loss.

- :func:`check_eval_bitwise`: ``eval()`` outputs of the wrapped model equal the unwrapped ones.
- :func:`check_train_primary`: a training call with ``labels`` and every auxiliary route weight 0
  gives the unwrapped model's loss (denoising included) and outputs, bit for bit.
- :func:`check_route_loss`: with the default weights the loss holds every auxiliary route's terms
  and its backward reaches every parameter the routes added; the primary loss alone reaches none.
- :func:`check_round_trip`: ``unwrap`` + ``save_pretrained`` + ``from_pretrained`` gives the
  unwrapped model's keys and its outputs.
"""

from __future__ import annotations

import copy

import torch

from mrdetr import adapters, routes
from mrdetr.testing.hf_families import tiny_batch, tiny_model

ROUTES = routes.mr_detr(num_instruction_tokens=3)
# parameters whose gradient is exactly 0 by the host's design, as the host's own copy's:
# Table Transformer is pre-norm and its queries enter as zeros, so the first layer's
# self-attention norm normalises zeros (tests/test_hf_family_detr.py shows the host's is 0 too)
ZERO_GRAD = {"table_transformer": {"aux.0.aux_instruct.self_attn_norm.weight"}}
AUX = [r.name for r in ROUTES[1:]]


def _pair(family: str):
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    adapters.wrap(model, ROUTES)
    return model, plain


def _added(model) -> dict:
    decoder = next(m for m in model.modules() if "mrdetr_routes" in m._modules)
    return dict(decoder.mrdetr_routes.named_parameters())


def _tensors(output) -> dict:
    return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}


def check_eval_bitwise(family: str) -> None:
    model, plain = _pair(family)
    batch = tiny_batch(model)
    batch.pop("labels", None)
    model.eval(), plain.eval()
    with torch.no_grad():
        got, want = _tensors(model(**batch)), _tensors(plain(**batch))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def check_train_primary(family: str) -> None:
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    adapters.wrap(model, ROUTES, route_weights=dict.fromkeys(AUX, 0.0))
    batch = tiny_batch(model)
    torch.manual_seed(1)  # denoising queries are drawn at random
    got = model(**batch)
    torch.manual_seed(1)
    want = plain(**batch)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.pred_boxes, want.pred_boxes)
    if "labels" in batch:
        assert torch.equal(got.loss, want.loss)
        assert got.loss_dict.keys() == want.loss_dict.keys()
    adapters.route_outputs(model)  # every route ran


def check_route_loss(family: str) -> None:
    model, plain = _pair(family)
    batch = tiny_batch(model)
    torch.manual_seed(1)
    out = model(**batch)
    torch.manual_seed(1)
    want = plain(**batch)
    for route in AUX:
        assert any(k.startswith(f"{route}/") for k in out.loss_dict), (route, list(out.loss_dict))
    assert torch.isfinite(out.loss) and not torch.equal(out.loss, want.loss)
    out.loss.backward()
    added = _added(model)
    assert added
    for name, p in added.items():
        if name not in ZERO_GRAD.get(family, ()):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the primary route's own loss (the unwrapped model's) never reaches the routes' parameters
    model.zero_grad()
    adapters.unwrap(model)
    adapters.wrap(model, ROUTES, route_weights=dict.fromkeys(AUX, 0.0))
    model(**batch).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in _added(model).values())


def check_round_trip(family: str, tmp_path) -> None:
    model = tiny_model(family)
    keys = list(model.state_dict())
    adapters.wrap(model, ROUTES)
    batch = tiny_batch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**batch).loss.backward()
    # as DETR recipes do (tiny DEIMv2's encoder gets gradients ~1e8: an unclipped step is NaN)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    adapters.unwrap(model)
    assert list(model.state_dict()) == keys
    try:
        model.save_pretrained(tmp_path)
    except RuntimeError as err:  # transformers 4.x: box heads shared with the decoder
        if "shared tensors" not in str(err):
            raise
        model.save_pretrained(tmp_path, safe_serialization=False)
    loaded = type(model).from_pretrained(tmp_path)
    assert list(loaded.state_dict()) == keys
    batch.pop("labels", None)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
