"""Layer input conventions: attention-mask dtypes, key-padding-mask dtype, number of levels.

Integer masks must be rejected (they used to be added to the logits as +1, which blocks nothing),
floating masks of any dtype must act like the boolean mask they encode, and ``spatial_shapes`` /
``level_start_index`` with another number of levels than the layer's must raise a ``ValueError``
naming both (it used to be a raw broadcast error, or silently fewer levels).
"""

import pytest
import torch
from test_decoder import decode, make_decoder
from test_decoder import make_inputs as decoder_inputs
from test_multi_route_oracle import LEVELS, SHAPES, STARTS, C, make_inputs, make_layer, run

from mrdetr import routes
from mrdetr.layers.instructive_attention import InstructiveSelfAttention, MultiHeadSelfAttention
from mrdetr.layers.ms_deform_attn import MultiScaleDeformableAttention
from mrdetr.routing import attention_weights, instructive_attend

Q = 9
INT_DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64]


def _causal(q=Q):
    return torch.ones(q, q, dtype=torch.bool).triu(1)  # True above the diagonal blocks


def _attn_inputs():
    torch.manual_seed(0)
    return MultiHeadSelfAttention(16, 4), torch.randn(2, Q, 16), torch.randn(2, Q, 16)


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_integer_attn_mask_rejected_everywhere(dtype):
    attn, x, pos = _attn_inputs()
    mask = _causal().to(dtype)
    calls = {
        "MultiHeadSelfAttention": lambda: attn(x, pos, attn_mask=mask),
        "InstructiveSelfAttention": lambda: InstructiveSelfAttention(16, 4, 3)(
            x, pos, attn_mask=mask
        ),
        "instructive_attend": lambda: instructive_attend(
            x + pos, None, x, attention_weights(attn), attn_mask=mask
        ),
    }
    for call in calls.values():
        with pytest.raises(TypeError, match=f"attn_mask must be bool.*got {dtype}"):
            call()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_self_attn_mask_rejected_by_layer_and_decoder(dtype):
    layer = make_layer(routes.mr_detr(3))
    query, pos, ref, value = make_inputs(3, queries=Q)
    with pytest.raises(TypeError, match="self_attn_mask must be bool"):
        run(layer, query, pos, ref, value, self_attn_mask=_causal().to(dtype))
    dec = make_decoder()
    q, p, boxes, v, ratios = decoder_inputs()
    with pytest.raises(TypeError, match="self_attn_mask must be bool"):
        decode(dec, q, p, boxes, v, ratios, self_attn_mask=_causal(q.shape[2]).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_floating_masks_of_any_dtype_equal_the_bool_mask(dtype):
    """A -inf/0 mask in any floating dtype blocks exactly what the bool mask blocks."""
    attn, x, pos = _attn_inputs()
    expected = attn(x, pos, attn_mask=_causal())
    additive = torch.zeros(Q, Q, dtype=dtype).masked_fill(_causal(), float("-inf"))
    torch.testing.assert_close(attn(x, pos, attn_mask=additive), expected)
    # oracle: row i only sees keys 0..i, so the first query's output ignores every other query
    first = attn(x[:, :1], pos[:, :1])
    torch.testing.assert_close(expected[:, :1], first, atol=1e-6, rtol=1e-5)


def test_attn_mask_wrong_shape_or_type():
    attn, x, pos = _attn_inputs()
    with pytest.raises(ValueError, match=r"attn_mask must be \[Q, Q\]"):
        attn(x, pos, attn_mask=torch.zeros(2 * 4, Q, Q, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be a Tensor"):
        attn(x, pos, attn_mask=[[False] * Q] * Q)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_non_bool_key_padding_mask_rejected(dtype):
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(16, 4, LEVELS, 2, backend="pytorch")
    q, v = torch.randn(2, 5, 16), torch.randn(2, 60, 16)
    kpm = torch.zeros(2, 60, dtype=dtype)
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        m(q, torch.rand(2, 5, 2), v, SHAPES, STARTS, kpm)


def _three_levels():
    shapes = torch.cat([SHAPES, torch.tensor([[1, 2]])])
    return shapes, torch.cat([STARTS, torch.tensor([60])])


@pytest.mark.parametrize("which", ["more", "fewer", "start_index"])
def test_level_count_mismatch_names_both(which):
    shapes, starts = SHAPES, STARTS
    if which == "more":
        shapes, starts = _three_levels()
    elif which == "fewer":
        shapes, starts = SHAPES[:1], STARTS[:1]
    else:
        starts = STARTS[:1]
    name = "level_start_index" if which == "start_index" else "spatial_shapes"
    match = f"{name} must be .* num_levels={LEVELS}.* got"
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(C, 4, LEVELS, 2, backend="pytorch")
    query, pos, ref, value = make_inputs(3, queries=Q)
    with pytest.raises(ValueError, match=match):
        m(query[0], ref[0], value, shapes, starts)
    layer = make_layer(routes.mr_detr(3))
    with pytest.raises(ValueError, match=match):
        layer(query, query_pos=pos, reference_points=ref, value=value,
              spatial_shapes=shapes, level_start_index=starts)  # fmt: skip
    dec = make_decoder()
    q, p, boxes, v, ratios = decoder_inputs()
    with pytest.raises(ValueError, match=match):
        dec(q, reference_points=boxes, value=v, spatial_shapes=shapes,
            level_start_index=starts, query_pos=p)  # fmt: skip


def test_matching_level_count_still_runs():
    """The checks reject only mismatches: the test geometry itself passes through the layer."""
    layer = make_layer(routes.mr_detr(3))
    query, pos, ref, value = make_inputs(3, queries=Q)
    out = run(layer, query, pos, ref, value, self_attn_mask=_causal())
    assert out.shape == query.shape and torch.isfinite(out).all()
