"""MaskHead: shapes, gradients, packed routes, and a naive per-query re-implementation as oracle."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from mrdetr.segmentation import MaskHead, attention_maps

SHAPES = torch.tensor([[8, 12], [4, 6], [2, 3]])


def memory_inputs(b=2, c=16, gen=None):
    start = torch.cat([SHAPES.new_zeros(1), SHAPES.prod(1).cumsum(0)[:-1]])
    s = int(SHAPES.prod(1).sum())
    return torch.randn(b, s, c, generator=gen, dtype=torch.float64), SHAPES, start


def naive(head, hidden, memory, shapes, start):
    """The head written per query with plain ops and an explicit concatenation (DETR's layout)."""
    b = memory.shape[0]
    c, m = head.embed_dim, head.num_heads

    def level(lvl):
        h, w = (int(x) for x in shapes[lvl])
        s = int(start[lvl])
        return memory[:, s : s + h * w].transpose(1, 2).reshape(b, c, h, w)

    outs = []
    for n in range(hidden.shape[0]):
        img = n % b
        feat = level(head.attn_level)[img]  # [C, H, W]
        h, w = feat.shape[-2:]
        keys = head.k_proj(feat[None])[0].reshape(m, c // m, h * w)
        per_query = []
        for q in range(hidden.shape[1]):
            qh = head.q_proj(hidden[n, q]).reshape(m, c // m)
            att = torch.stack([(qh[j] @ keys[j] / (c / m) ** 0.5).softmax(-1) for j in range(m)])
            x = torch.cat([feat, att.reshape(m, h, w)], 0)[None]  # [1, C+M, H, W]
            weight = torch.cat([head.feat_in.weight, head.maps_in.weight], 1)
            x = F.relu(head.norm_in(F.conv2d(x, weight, head.feat_in.bias, padding=1)))
            x = head.block1(x)
            for i in range(head.attn_level):
                side = head.adapters[i](level(head.attn_level - 1 - i)[img][None])
                x = head.blocks[i](side + F.interpolate(x, size=side.shape[-2:]))
            per_query.append(head.out(x)[0, 0])
        outs.append(torch.stack(per_query))
    return torch.stack(outs)


def test_shapes_and_oracle():
    gen = torch.Generator().manual_seed(0)
    head = MaskHead(embed_dim=16, num_levels=3, num_heads=4, conv_dim=32).double()
    memory, shapes, start = memory_inputs(gen=gen)
    hidden = torch.randn(3 * 2, 5, 16, generator=gen, dtype=torch.float64)  # R=3, B=2
    out = head(hidden, memory, shapes, start)
    assert out.shape == (6, 5, 8, 12)  # finest level's resolution
    torch.testing.assert_close(out, naive(head, hidden, memory, shapes, start))
    # routes are independent: running each route's slice alone gives its slice of the packed run
    for r in range(3):
        alone = head(hidden[2 * r : 2 * r + 2], memory, shapes, start)
        torch.testing.assert_close(alone, out[2 * r : 2 * r + 2])


@pytest.mark.parametrize("attn_level", [0, 1, -1])
def test_gradients_reach_every_parameter(attn_level):
    head = MaskHead(embed_dim=16, num_levels=3, num_heads=4, conv_dim=16, attn_level=attn_level)
    memory, shapes, start = memory_inputs()
    memory = memory.float().requires_grad_()
    hidden = torch.randn(4, 3, 16, requires_grad=True)
    out = head(hidden, memory, shapes, start)
    assert out.shape == (4, 3, 8, 12)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert hidden.grad.abs().sum() > 0 and memory.grad.abs().sum() > 0


def test_gradcheck_float64():
    head = MaskHead(embed_dim=8, num_levels=2, num_heads=2, conv_dim=8).double()
    shapes = torch.tensor([[4, 4], [2, 2]])
    start = torch.tensor([0, 16])
    memory = torch.randn(1, 20, 8, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 2, 8, dtype=torch.float64, requires_grad=True)
    fn = lambda h, m: head(h, m, shapes, start)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, memory), fast_mode=True)


def test_attention_maps_sum_to_one_and_respect_padding():
    q, k = torch.randn(2, 1, 3, 8), torch.randn(1, 8, 4, 5)
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    mask[:, :, 3:] = True
    maps = attention_maps(q, k, 2, mask)
    assert maps.shape == (2, 1, 3, 2, 4, 5)
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(2, 1, 3, 2))
    assert maps[..., 3:].abs().max() == 0
    # padding masks memory positions of the attention level end to end
    head = MaskHead(embed_dim=16, num_levels=3, num_heads=4, conv_dim=16)
    memory, shapes, start = memory_inputs()
    kpm = torch.zeros(2, memory.shape[1], dtype=torch.bool)
    kpm[:, -3:] = True  # last row of the coarsest level
    a = head(torch.randn(2, 3, 16), memory.float(), shapes, start, kpm)
    assert torch.isfinite(a).all()


def test_deepcopy_pickle_inference_mode():
    head = MaskHead(embed_dim=16, num_levels=3, num_heads=4, conv_dim=16).eval()
    memory, shapes, start = memory_inputs()
    hidden = torch.randn(2, 3, 16)
    ref = head(hidden, memory.float(), shapes, start)
    for other in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        with torch.inference_mode():
            torch.testing.assert_close(other(hidden, memory.float(), shapes, start), ref)


def test_bad_input():
    head = MaskHead(embed_dim=16, num_levels=3, num_heads=4, conv_dim=16)
    memory, shapes, start = memory_inputs()
    memory = memory.float()
    with pytest.raises(ValueError, match="hidden"):
        head(torch.randn(3, 3, 16), memory, shapes, start)  # 3 is not R * 2
    with pytest.raises(ValueError, match="memory"):
        head(torch.randn(2, 3, 16), memory[:, :-1], shapes, start)
    with pytest.raises(ValueError, match="spatial_shapes"):
        head(torch.randn(2, 3, 16), memory, shapes[:2], start[:2])
    with pytest.raises(ValueError, match="num_heads"):
        MaskHead(embed_dim=16, num_heads=3)
    with pytest.raises(ValueError, match="attn_level"):
        MaskHead(num_levels=3, attn_level=3)
