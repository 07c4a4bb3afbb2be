"""A compact Deformable-DETR built from mrdetr parts: ``ToyDETRConfig``, ``build_model(cfg)``.

Backbone (a small conv/GroupNorm stack trained from scratch, strides 8/16/32) -> 1x1 projections +
GroupNorm -> sine + level embeddings -> ``num_encoder_layers`` encoder layers on
``MultiScaleDeformableAttention`` -> ``MultiRouteDecoder`` with iterative box refinement and a
DINO-style ``query_pos_head`` -> one class head shared by every layer and route, one box MLP per
layer.

Queries: ``two_stage=False`` learns ``num_queries`` content queries and reference boxes shared by
all routes. ``two_stage=True`` (the paper's Deformable-DETR++ recipe) takes the reference boxes
from the top-k encoder proposals (detached) and gives every route with instruction tokens its own
proposal heads and top-k (supervised one-to-many through that route's ``enc_outputs``), while the
other routes reuse the primary route's proposals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from mrdetr import MultiRouteDecoder, MultiScaleDeformableAttention, routes
from mrdetr.layers import inverse_sigmoid
from mrdetr.segmentation import MaskHead

__all__ = ["ROUTE_SETS", "ToyDETR", "ToyDETRConfig", "build_model", "route_set"]

ROUTE_SETS = {"baseline": routes.baseline, "mr_detr": routes.mr_detr,
              "mr_detr_moe": routes.mr_detr_moe}  # fmt: skip
"""Route presets selectable by name (``--routes``); add an entry to register another."""


def route_set(name: str, num_instruction_tokens: int = 10):
    """The route tuple of preset ``name`` (a key of :data:`ROUTE_SETS`)."""
    if name not in ROUTE_SETS:
        raise ValueError(f"routes must be one of {sorted(ROUTE_SETS)}, got {name!r}")
    if name in ("mr_detr", "mr_detr_moe"):
        return ROUTE_SETS[name](num_instruction_tokens)
    return ROUTE_SETS[name]()


@dataclass
class ToyDETRConfig:
    """Model settings (defaults: the demo's)."""

    num_classes: int = 4
    routes: str = "baseline"
    dim: int = 128
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 512
    num_encoder_layers: int = 1
    num_decoder_layers: int = 3
    num_queries: int = 100
    num_instruction_tokens: int = 10
    two_stage: bool = False
    backbone_width: int = 32
    masks: bool = False

    def to_dict(self) -> dict:
        """The settings as a plain dict (for ``results.json`` and checkpoints)."""
        return asdict(self)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(True)
    )


class Backbone(nn.Module):
    """Conv/GroupNorm/ReLU stack (GroupNorm: a DDP run computes what one process would);
    ``forward(x [B, 3, H, W])`` -> maps at strides 8, 16, 32."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(3, w, 2), _conv(w, w, 1), _conv(w, 2 * w, 2))
        self.c3 = nn.Sequential(_conv(2 * w, 3 * w, 2), _conv(3 * w, 3 * w, 1))
        self.c4 = _conv(3 * w, 4 * w, 2)
        self.c5 = _conv(4 * w, 6 * w, 2)
        self.channels = (3 * w, 4 * w, 6 * w)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x (Tensor[B, 3, H, W])`` -> ``[Tensor[B, C_l, H/s, W/s]]`` for s = 8, 16, 32."""
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        return [c3, c4, self.c5(c4)]


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU(True)]
    return nn.Sequential(*layers[:-1])


def sine_embed(x: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised coordinates ``x (Tensor[..., D])`` -> ``Tensor[..., D*dim]``
    (``dim // 2`` frequencies, sin and cos, per coordinate; DINO's box embedding)."""
    freq = temperature ** (2 * (torch.arange(dim // 2, device=x.device) / dim))
    t = x[..., None] * (2 * math.pi) / freq  # [..., D, dim/2]
    return torch.cat([t.sin(), t.cos()], -1).flatten(-2)  # [..., D*dim]


class EncoderLayer(nn.Module):
    """Deformable self-attention over the flattened maps + FFN, post-norm."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int) -> None:
        super().__init__()
        self.attn = MultiScaleDeformableAttention(dim, heads, levels, points)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = mlp([dim, ffn_dim, dim])

    def forward(self, x: Tensor, pos: Tensor, ref: Tensor, shapes: Tensor, starts: Tensor):
        """``x, pos (Tensor[B, S, C])``, ``ref (Tensor[B, S, 2])`` -> ``Tensor[B, S, C]``."""
        x = self.norm1(x + self.attn(x + pos, ref, x, shapes, starts))
        return self.norm2(x + self.ffn(x))


class ToyDETR(nn.Module):
    """Compact multi-route Deformable-DETR (see the module docstring); built by ``build_model``.

    ``forward(images (Tensor[B, 3, H, W]))`` -> ``{route: {"pred_logits" [B, Q, K],
    "pred_boxes" [B, Q, 4] (cxcywh in [0, 1]), "aux_outputs": [...per earlier layer],
    "enc_outputs" (two-stage, routes with their own proposals)}}``: every route while the decoder
    is in training mode, the primary route alone otherwise.
    """

    def __init__(self, cfg: ToyDETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.route_set = route_set(cfg.routes, cfg.num_instruction_tokens)
        d, levels = cfg.dim, 3
        self.backbone = Backbone(cfg.backbone_width)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in self.backbone.channels
        )
        self.level_embed = nn.Parameter(torch.randn(levels, d) * 0.02)
        self.encoder = nn.ModuleList(
            EncoderLayer(d, cfg.num_heads, levels, cfg.num_points, cfg.ffn_dim)
            for _ in range(cfg.num_encoder_layers)
        )
        self.decoder = MultiRouteDecoder(
            cfg.num_decoder_layers,
            embed_dim=d,
            num_heads=cfg.num_heads,
            ffn_dim=cfg.ffn_dim,
            num_levels=levels,
            num_points=cfg.num_points,
            dropout=0.0,
            routes=self.route_set,
        )
        self.query = nn.Parameter(torch.randn(cfg.num_queries, d) * 0.1)
        self.query_pos_head = mlp([2 * d, d, d])
        self.class_head = nn.Linear(d, cfg.num_classes)
        self.box_heads = nn.ModuleList(mlp([d, d, d, 4]) for _ in range(cfg.num_decoder_layers))
        if cfg.masks:  # one mask head shared by every route (mrdetr.segmentation)
            self.mask_head = MaskHead(d, levels, cfg.num_heads, conv_dim=max(d // 2, 8))
        # proposal groups: the primary's, plus one per route with instruction tokens (two-stage)
        self.proposal_owner = {r.name: "primary" for r in self.route_set}
        if cfg.two_stage:
            for r in self.route_set[1:]:
                if r.num_instruction_tokens > 0:
                    self.proposal_owner[r.name] = r.name
            self.enc_proj = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
            owners = sorted(set(self.proposal_owner.values()))
            self.enc_class = nn.ModuleDict({g: nn.Linear(d, cfg.num_classes) for g in owners})
            self.enc_box = nn.ModuleDict({g: mlp([d, d, d, 4]) for g in owners})
        else:
            self.ref_logits = nn.Parameter(torch.empty(cfg.num_queries, 4))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Focal prior 0.01 on class heads, zero last box layers, spread reference boxes."""
        bias = -math.log((1 - 0.01) / 0.01)
        heads = [self.class_head] + list(getattr(self, "enc_class", {}).values())
        for head in heads:
            nn.init.constant_(head.bias, bias)
        for head in list(self.box_heads) + list(getattr(self, "enc_box", {}).values()):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
        if hasattr(self, "ref_logits"):
            with torch.no_grad():
                self.ref_logits[:, :2].uniform_(-2.0, 2.0)
                self.ref_logits[:, 2:].fill_(-1.5)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``images [B, 3, H, W]`` -> ``(memory [B, S, C], shapes [L, 2], starts [L])``."""
        feats = [proj(f) for proj, f in zip(self.input_proj, self.backbone(images), strict=True)]
        shapes = torch.tensor([f.shape[-2:] for f in feats], device=images.device)
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        x, pos, ref = [], [], []
        for lvl, f in enumerate(feats):
            h, w = f.shape[-2:]
            ys, xs = torch.meshgrid(
                (torch.arange(h, device=f.device) + 0.5) / h,
                (torch.arange(w, device=f.device) + 0.5) / w,
                indexing="ij",
            )
            grid = torch.stack([xs, ys], -1).flatten(0, 1)  # [h*w, 2]
            x.append(f.flatten(2).transpose(1, 2))  # [B, h*w, C]
            pos.append(sine_embed(grid, f.shape[1] // 2) + self.level_embed[lvl])
            ref.append(grid)
        x, pos, ref = torch.cat(x, 1), torch.cat(pos)[None], torch.cat(ref)
        ref = ref[None].expand(x.shape[0], -1, -1)
        for layer in self.encoder:
            x = layer(x, pos, ref, shapes, starts)
        return x, shapes, starts

    def _anchors(self, shapes: Tensor, device) -> Tensor:
        """Anchor boxes in logit space, one per memory position; ``Tensor[S, 4]``."""
        out = []
        for lvl, (h, w) in enumerate(shapes.tolist()):
            ys, xs = torch.meshgrid(
                (torch.arange(h, device=device) + 0.5) / h,
                (torch.arange(w, device=device) + 0.5) / w,
                indexing="ij",
            )
            wh = torch.full((h * w, 2), 0.1 * 2.0**lvl, device=device)
            out.append(torch.cat([xs.reshape(-1, 1), ys.reshape(-1, 1), wh], 1))
        return inverse_sigmoid(torch.cat(out))

    def proposals(self, memory: Tensor, shapes: Tensor, groups) -> dict:
        """Two-stage proposals per group: ``{group: (enc_outputs, ref [B, Q, 4] detached)}``."""
        enc = self.enc_proj(memory)
        anchors = self._anchors(shapes, memory.device)
        out = {}
        for g in groups:
            logits = self.enc_class[g](enc)  # [B, S, K]
            box_logits = self.enc_box[g](enc) + anchors
            k = min(self.cfg.num_queries, logits.shape[1])
            top = logits.max(-1).values.topk(k, dim=1).indices  # [B, Q]
            ref = box_logits.gather(1, top[..., None].expand(-1, -1, 4)).sigmoid().detach()
            out[g] = ({"pred_logits": logits, "pred_boxes": box_logits.sigmoid()}, ref)
        return out

    def forward(self, images: Tensor) -> dict:
        """See the class docstring."""
        memory, shapes, starts = self.encode(images)
        names = [r.name for r in self.route_set]
        names = names if self.decoder.training else names[: len(self.decoder.eval_route_names)]
        b, (q, d) = images.shape[0], self.query.shape
        if self.cfg.two_stage:
            props = self.proposals(memory, shapes, sorted({self.proposal_owner[n] for n in names}))
            ref = torch.stack([props[self.proposal_owner[n]][1] for n in names])  # [R, B, Q, 4]
            q = ref.shape[2]
        else:
            ref = self.ref_logits.sigmoid().expand(len(names), b, q, 4)
        query = self.query[:q].expand(len(names), b, q, d)
        out = self.decoder(
            query,
            reference_points=ref,
            value=memory,
            spatial_shapes=shapes,
            level_start_index=starts,
            box_heads=self.box_heads,
            query_pos_head=lambda r: self.query_pos_head(sine_embed(r, self.cfg.dim // 2)),
        )
        outputs = {}
        masks = None
        if self.cfg.masks:  # last layer of every route, packed: [R*B, Q, C] -> [R, B, Q, h, w]
            hid = out.hidden_states[-1]
            masks = self.mask_head(hid.flatten(0, 1), memory, shapes, starts)
            masks = masks.view(*hid.shape[:3], *masks.shape[-2:])
        moe = out.balance_losses if self.decoder.training else {}
        for i, name in enumerate(names):
            layers = []
            for l, (hid, rp) in enumerate(
                zip(out.hidden_states, out.reference_points, strict=True)
            ):
                boxes = (self.box_heads[l](hid[i]) + inverse_sigmoid(rp[i])).sigmoid()
                layers.append({"pred_logits": self.class_head(hid[i]), "pred_boxes": boxes})
            outputs[name] = {**layers[-1], "aux_outputs": layers[:-1]}
            if masks is not None:
                outputs[name]["pred_masks"] = masks[i]
            if name in moe:
                outputs[name]["loss_moe"] = moe[name]
            if self.cfg.two_stage and self.proposal_owner[name] == name:
                outputs[name]["enc_outputs"] = props[name][0]
        return outputs


def build_model(cfg: ToyDETRConfig) -> ToyDETR:
    """Build a :class:`ToyDETR` (seed torch first for reproducible weights)."""
    if not isinstance(cfg, ToyDETRConfig):
        raise TypeError(f"cfg must be a ToyDETRConfig, got {type(cfg).__name__}")
    return ToyDETR(cfg)
