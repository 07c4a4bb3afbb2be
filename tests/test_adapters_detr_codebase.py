"""The original DETR codebase's decoder (re-implemented in mrdetr/testing/detr_codebase.py)
wrapped through a DecoderSpec: the primary route's predictions equal the model's own, and
every spec mistake raises a ValueError naming its field."""

import copy
import re
from pathlib import Path

import pytest
import torch

from mrdetr import adapters, routes
from mrdetr.adapters import DecoderSpec
from mrdetr.criterion import MultiRouteCriterion
from mrdetr.matching import RouteMatcher
from mrdetr.testing import detr_codebase

ROOT = Path(__file__).resolve().parents[1]

K, Q, B, S, C = 5, 10, 2, 7, 32
SPEC = DecoderSpec(
    decoder="transformer.decoder", layers="layers", self_attn="self_attn",
    self_attn_norm="norm1", ffn=("linear1", "linear2"), final_norm="norm",
    query_inputs={"tgt": 0, "query_pos": 0}, batch_first=False, output_query_dim=1,
)  # fmt: skip


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    memory, pos = torch.randn(S, B, C, generator=g), torch.randn(S, B, C, generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[1, -2:] = True  # the second image is padded
    return memory, pos, mask


def model_pair(dropout=0.0, **kw):
    torch.manual_seed(0)
    model = detr_codebase.DetrDecoderModel(K, C, num_queries=Q, dropout=dropout, **kw)
    with torch.no_grad():  # trained-looking norms (a fresh final norm after norm3 is ~identity)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.5), m.bias.normal_(0.0, 0.5)
    return model, copy.deepcopy(model)


def layers_of(out):
    return [*out["aux_outputs"], out]


@pytest.mark.parametrize("normalize_before", [False, True])
@pytest.mark.parametrize("return_intermediate", [True, False])
def test_primary_route_predictions_equal_the_models_own(normalize_before, return_intermediate):
    model, plain = model_pair(
        normalize_before=normalize_before, return_intermediate=return_intermediate
    )
    adapters.wrap(model, routes.mr_detr(num_instruction_tokens=2), spec=SPEC)
    memory, pos, mask = inputs()
    out = model(memory, pos, mask)
    preds = adapters.route_predictions(
        adapters.route_outputs(model), model.class_embed, model.bbox_embed
    )
    want = plain(memory, pos, mask)  # the unwrapped model, train mode (no dropout)
    got = layers_of(preds["primary"])
    assert len(got) == 3
    # the model's own layers: all three with return_intermediate, else the last one. Equal up
    # to float rounding only: the heads run on every route at once ([R, B, Q, C]), the model's
    # on its stacked layers ([N, B, Q, C]), and a matmul's rounding may follow its batch shape.
    mine, theirs = layers_of(out)[::-1], layers_of(want)[::-1]
    for have, own, ref in zip(got[::-1][: len(mine)], mine, theirs, strict=True):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(have[key], own[key], atol=1e-6, rtol=0)
            torch.testing.assert_close(have[key], ref[key], atol=1e-6, rtol=0)
    assert preds["primary"]["pred_logits"].shape == (B, Q, K + 1)
    assert set(preds) == {"primary", "aux_ffn", "aux_instruct"}


def test_without_the_final_norm_the_predictions_differ():
    """What final_norm fixes: the hidden states before DETR's norm give other logits."""
    model, _ = model_pair()
    adapters.wrap(model, spec=DecoderSpec(**{**SPEC.__dict__, "final_norm": None}))
    out = model(*inputs())
    preds = adapters.route_predictions(
        adapters.route_outputs(model), model.class_embed, model.bbox_embed
    )
    gap = (preds["primary"]["pred_logits"] - out["pred_logits"]).abs().max()
    assert gap > 1e-2


def test_auto_final_norm_finds_the_decoders_norm():
    model, _ = model_pair()
    adapters.wrap(model, spec=DecoderSpec(**{**SPEC.__dict__, "final_norm": "auto"}))
    out = model(*inputs())
    preds = adapters.route_predictions(
        adapters.route_outputs(model), model.class_embed, model.bbox_embed
    )
    assert torch.equal(preds["primary"]["pred_logits"], out["pred_logits"])


def test_eval_is_bitwise_the_unwrapped_model_and_unwrap_restores_keys():
    model, plain = model_pair(dropout=0.1)
    adapters.wrap(model, spec=SPEC)
    model.eval(), plain.eval()
    a, b = model(*inputs()), plain(*inputs())
    for x, y in zip(layers_of(a), layers_of(b), strict=True):
        assert torch.equal(x["pred_logits"], y["pred_logits"])
        assert torch.equal(x["pred_boxes"], y["pred_boxes"])
    adapters.unwrap(model)
    assert set(model.state_dict()) == set(plain.state_dict())


def test_softmax_criterion_trains_the_auxiliary_routes_and_primary_loss_never_reaches_them():
    model, _ = model_pair(dropout=0.1)
    rs = routes.mr_detr(num_instruction_tokens=2)
    adapters.wrap(model, rs, spec=SPEC)
    criterion = MultiRouteCriterion(
        K, RouteMatcher.for_routes(rs, classification="softmax"), classification="softmax"
    )
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]] * 2)},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.3, 0.6, 0.1, 0.1]])},
    ]
    aux_params = dict(model.transformer.decoder.mrdetr_routes.named_parameters())
    assert aux_params
    model(*inputs())
    preds = adapters.route_predictions(
        adapters.route_outputs(model), model.class_embed, model.bbox_embed
    )
    primary_only = criterion({"primary": preds["primary"]}, targets)["loss"]
    primary_only.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in aux_params.values())
    criterion(preds, targets)["loss"].backward()
    missing = [n for n, p in aux_params.items() if p.grad is None or not p.grad.any()]
    assert not missing


def wrap_with(**changes):
    model, _ = model_pair()
    return model, adapters.wrap(model, spec=DecoderSpec(**{**SPEC.__dict__, **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"query_inputs": {"tgt": 1, "query_pos": 1}},
         r"spec.query_inputs\['tgt'\]: expected axis 0 .* found 1"),
        ({"batch_first": True, "query_inputs": {"tgt": 1, "query_pos": 1}},
         r"spec.batch_first: expected False .*mixes positions along axis 0.* found True"),
        ({"query_inputs": {"tgt": 0, "querry_pos": 0}},
         r"spec.query_inputs: expected argument names .* found 'querry_pos' "
         r"\(did you mean 'query_pos'\?\)"),
        ({"self_attn": "self_atn"}, r"spec.self_attn: .*no attribute 'self_atn'.*multihead_attn"),
        ({"layers": "layer"}, r"spec.layers: .*no attribute 'layer'"),
        ({"final_norm": "final_norm"}, r"spec.final_norm: .*no attribute 'final_norm'"),
        ({"self_attn": "linear1"}, r"spec.self_attn: expected a module called like"),
        ({"ffn": ("linear2", "linear1")}, r"spec.ffn: expected layers\[0\]"),
        ({"output_query_dim": -1}, r"spec.output_query_dim: expected None or an int >= 0"),
    ],
)  # fmt: skip
def test_spec_mistakes_are_named_at_wrap(changes, message):
    model, plain = model_pair()
    with pytest.raises(ValueError, match=message):
        adapters.wrap(model, spec=DecoderSpec(**{**SPEC.__dict__, **changes}))
    assert not adapters.is_wrapped(model)  # nothing attached
    assert set(model.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"output_query_dim": None},
         r"spec.output_query_dim: expected .* 30 packed queries .* on axis 0, found shapes "
         r"\[\(3, 30, 2, 32\)\] \(the packed queries are on axis 1\)"),
        ({"output_query_dim": 2}, r"spec.output_query_dim: expected .* on axis 2"),
        ({"query_inputs": {"tgt": 0, "query_pos": 1}},
         r"spec.query_inputs\['query_pos'\]: expected 10 queries along axis 1 .* found 2"),
    ],
)  # fmt: skip
def test_spec_mistakes_seen_only_in_a_call_are_named_at_the_first_training_call(changes, message):
    model, _ = wrap_with(**changes)
    with pytest.raises(ValueError, match=message):
        model(*inputs())


def test_the_documented_glue_is_at_most_eight_lines():
    page = (ROOT / "docs" / "integrations.md").read_text()
    section = page.split("## The original DETR codebase", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    glue = next(b for b in blocks if "DecoderSpec(" in b)
    lines = [ln for ln in glue.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) <= 8, lines
