"""Shared helpers for the export tests: a stripped decoder with heads, inputs, an ORT runner."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.export import Dim

from mrdetr import MultiRouteDecoder, routes


def level_inputs(levels, generator=None):
    """``spatial_shapes`` ``[L, 2]`` and ``level_start_index`` ``[L]`` for ``levels``."""
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes.prod(1)
    return shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


class DecoderWithHeads(nn.Module):
    """A deployed DETR head: stripped ``MultiRouteDecoder`` with box refinement, class head.

    forward(query [B, Q, C], boxes [B, Q, 4], memory [B, S, C], spatial_shapes [L, 2],
    level_start_index [L], valid_ratios [B, L, 2]) -> (logits [B, Q, K], boxes [B, Q, 4]).
    """

    def __init__(self, embed_dim=32, num_heads=4, num_levels=2, num_layers=2, num_classes=3):
        super().__init__()
        self.decoder = MultiRouteDecoder(
            num_layers,
            embed_dim=embed_dim,
            num_heads=num_heads,
            ffn_dim=2 * embed_dim,
            num_levels=num_levels,
            num_points=2,
            routes=routes.mr_detr(),
        )
        self.box_heads = nn.ModuleList(nn.Linear(embed_dim, 4) for _ in range(num_layers))
        self.class_head = nn.Linear(embed_dim, num_classes)

    def forward(self, query, boxes, memory, spatial_shapes, level_start_index, valid_ratios):
        out = self.decoder(
            query[None],
            reference_points=boxes[None],
            value=memory,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            box_heads=self.box_heads,
        )
        last = out.hidden_states[-1, 0]  # [B, Q, C]
        ref = out.reference_points[-1, 0]
        box = (self.box_heads[-1](last) + torch.logit(ref.clamp(1e-5, 1 - 1e-5))).sigmoid()
        return self.class_head(last), box


def stripped_decoder():
    """A seeded :class:`DecoderWithHeads`, stripped to the primary route, in eval mode, and the
    ``dynamic_shapes`` of its inputs (batch, queries and memory positions vary)."""
    torch.manual_seed(0)
    model = DecoderWithHeads()
    model.decoder.strip_auxiliary()
    model.eval()
    batch, queries = Dim("batch"), Dim("queries")
    dyn = (
        {0: batch, 1: queries},
        {0: batch, 1: queries},
        {0: batch, 1: Dim("positions")},
        None,
        None,
        {0: batch},
    )
    return model, dyn


def decoder_inputs(batch, queries, levels, embed_dim=32, seed=0):
    """Random inputs of :class:`DecoderWithHeads` for the given batch, queries and level shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes, starts = level_inputs(levels)
    s = int(shapes.prod(1).sum())
    ratios = 0.7 + 0.3 * torch.rand(batch, len(levels), 2, generator=g)
    return (
        torch.randn(batch, queries, embed_dim, generator=g),
        torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25,
        torch.randn(batch, s, embed_dim, generator=g),
        shapes,
        starts,
        ratios,
    )


def run_onnxruntime(model_proto, args: tuple[Tensor, ...]) -> list[Tensor]:
    """Run an ONNX model with onnxruntime on one CPU thread; inputs in graph order."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        model_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=True)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]
