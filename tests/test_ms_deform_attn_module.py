"""MultiScaleDeformableAttention: initialisation, hand-checked sampling, masks, layouts, errors."""

from __future__ import annotations

import math

import pytest
import torch

from mrdetr import MultiScaleDeformableAttention

LEVELS = torch.tensor([[6, 8], [3, 4]])
STARTS = torch.tensor([0, 48])


def make(embed=16, heads=2, levels=2, points=3, **kw):
    torch.manual_seed(0)
    return MultiScaleDeformableAttention(embed, heads, levels, points, **kw).double()


def test_reset_parameters_matches_deformable_detr_init():
    m = make(heads=4, points=2)
    bias = m.sampling_offsets.bias.view(4, 2, 2, 2)  # [H, L, P, xy]
    for h in range(4):
        theta = 2 * math.pi * h / 4
        direction = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)
        direction = direction / direction.abs().max()
        for p in range(2):
            torch.testing.assert_close(bias[h, :, p], direction.expand(2, 2) * (p + 1))
    assert not m.sampling_offsets.weight.any()
    assert not m.attention_weights.weight.any() and not m.attention_weights.bias.any()
    assert not m.value_proj.bias.any() and not m.output_proj.bias.any()


def _point_at_pixel(m, value, q_xy_level, box=None):
    """Zero the offsets so every point sits on the reference point, then run the module."""
    with torch.no_grad():
        m.sampling_offsets.weight.zero_()
        m.sampling_offsets.bias.zero_()
    b, q = value.shape[0], 1
    query = torch.randn(b, q, m.embed_dim, dtype=torch.float64)
    ref = torch.tensor(q_xy_level, dtype=torch.float64).expand(b, q, -1, -1)
    if box is not None:
        ref = torch.cat([ref, torch.tensor(box, dtype=torch.float64).expand(b, q, 2, 2)], -1)
    return m(query, ref.contiguous(), value, LEVELS, STARTS)


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_point_on_pixel_centre_returns_projected_pixel(backend):
    """Hand oracle: all points on pixel (y=2, x=5) of level 0 and outside level 1, uniform
    attention weights (zero-initialised logits): the output is output_proj of
    (L*P of them, 1/(L*P) each, half the mass outside) = output_proj(value_proj(pixel) / 2)."""
    m = make(backend=backend)
    value = torch.randn(2, 60, 16, dtype=torch.float64)
    xy0 = [(5 + 0.5) / 8, (2 + 0.5) / 6]
    out = _point_at_pixel(m, value, [xy0, [2.0, 2.0]])
    pixel = m.value_proj(value[:, 2 * 8 + 5])  # [B, C]
    expected = m.output_proj(pixel / 2)
    torch.testing.assert_close(out[:, 0], expected)


def test_box_reference_scales_offsets_by_box_size():
    """4-d references: offset (P, 0) for every point moves it by half the box width."""
    m = make(points=3)
    value = torch.randn(1, 60, 16, dtype=torch.float64)
    with torch.no_grad():
        m.sampling_offsets.weight.zero_()
        bias = torch.zeros(2, 2, 3, 2, dtype=torch.float64)
        bias[..., 0] = 3.0
        m.sampling_offsets.bias.copy_(bias.flatten())
    box_w = 0.75  # offset (P, 0) / P * box_w / 2 = 0.375 = 3 pixels of level 0's width 8
    cx, cy = (1 + 0.5) / 8, (4 + 0.5) / 6  # pixel (y=4, x=1) -> moved to (y=4, x=4)
    ref = torch.tensor([cx, cy, box_w, 0.3], dtype=torch.float64).expand(1, 1, 2, 4).contiguous()
    ref[:, :, 1, :2] = 5.0  # level 1 points outside
    out = m(torch.zeros(1, 1, 16, dtype=torch.float64), ref, value, LEVELS, STARTS)
    expected = m.output_proj(m.value_proj(value[:, 4 * 8 + 4]) / 2)
    torch.testing.assert_close(out[:, 0], expected)


def test_key_padding_mask_hides_masked_values():
    m = make()
    value = torch.randn(2, 60, 16, dtype=torch.float64)
    query = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = torch.rand(2, 5, 2, 2, dtype=torch.float64)
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[0, 10:30] = True
    mask[1, 50:] = True
    out = m(query, ref, value, LEVELS, STARTS, key_padding_mask=mask)
    changed = value.masked_fill(mask[..., None], 1e3)
    out2 = m(query, ref, changed, LEVELS, STARTS, key_padding_mask=mask)
    torch.testing.assert_close(out, out2)
    out3 = m(query, ref, changed, LEVELS, STARTS)
    assert (out3 - out).abs().max() > 1.0  # without the mask the change is visible


def test_batch_first_false_and_level_broadcast():
    m = make()
    m2 = make(batch_first=False)
    m2.load_state_dict(m.state_dict())
    value = torch.randn(2, 60, 16, dtype=torch.float64)
    query = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = torch.rand(2, 5, 2, dtype=torch.float64)
    out = m(query, ref.unsqueeze(2).expand(-1, -1, 2, -1), value, LEVELS, STARTS)
    torch.testing.assert_close(m(query, ref, value, LEVELS, STARTS), out)
    out_t = m2(query.transpose(0, 1), ref, value.transpose(0, 1), LEVELS, STARTS)
    torch.testing.assert_close(out_t.transpose(0, 1), out)


def test_backends_agree_with_gradients():
    value = torch.randn(2, 60, 16, dtype=torch.float64)
    query = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = torch.rand(2, 5, 2, 4, dtype=torch.float64)
    grads = {}
    for backend in ("pytorch", "cpu"):
        m = make(backend=backend)
        with torch.no_grad():
            m.sampling_offsets.weight.normal_(std=0.5)
            m.attention_weights.weight.normal_()
        out = m(query, ref, value, LEVELS, STARTS)
        out.square().sum().backward()
        grads[backend] = (out.detach(), {n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(grads["cpu"][0], grads["pytorch"][0])
    for name, g in grads["pytorch"][1].items():
        torch.testing.assert_close(grads["cpu"][1][name], g, msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embed_dim": 10, "num_heads": 3}, "divisible by num_heads"),
        ({"num_levels": 0}, "num_levels must be >= 1"),
        ({"num_points": 0}, "num_points must be >= 1"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleDeformableAttention(**kwargs)


@pytest.mark.parametrize(
    "query, ref, value, mask, match",
    [
        ((2, 5, 8), (2, 5, 2, 2), (2, 60, 16), None, "query must be"),
        ((2, 5, 16), (2, 5, 3, 2), (2, 60, 16), None, "reference_points must be"),
        ((2, 5, 16), (2, 5, 2, 3), (2, 60, 16), None, "reference_points must be"),
        ((2, 5, 16), (2, 5, 2, 2), (3, 60, 16), None, "value must be"),
        ((2, 5, 16), (2, 5, 2, 2), (2, 60, 16), (2, 59), "key_padding_mask must be"),
        ((2, 5, 16), (2, 5, 2, 2), (2, 59, 16), None, "S=59"),
    ],
)
def test_bad_input_shapes(query, ref, value, mask, match):
    m = make()
    args = [torch.rand(s, dtype=torch.float64) for s in (query, ref, value)]
    kpm = None if mask is None else torch.zeros(mask, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        m(*args[:3], LEVELS, STARTS, key_padding_mask=kpm)
