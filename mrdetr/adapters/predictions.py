"""``route_predictions``: per-route decoder outputs + the model's heads -> the criterion's input."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..layers import inverse_sigmoid
from ..routes import Route

__all__ = ["route_predictions"]

Head = Callable[[Tensor], Tensor]


def _per_layer(heads: Head | Sequence[Head], n: int, name: str) -> list[Head]:
    if not isinstance(heads, (Sequence, nn.ModuleList)):
        if not callable(heads):
            raise TypeError(f"{name} must be a callable head or a sequence of them")
        return [heads] * n
    heads = list(heads)
    if len(heads) < n:
        raise ValueError(f"{name} must be one head or one per layer ({n}), got {len(heads)}")
    return heads[-n:]  # the last n heads when only the last layers were returned


def route_predictions(
    outputs,
    class_heads: Head | Sequence[Head],
    box_heads: Head | Sequence[Head] | None = None,
    *,
    routes: Sequence[Route] | None = None,
    enc_outputs: Mapping[str, Tensor] | None = None,
) -> dict[str, dict]:
    """Every layer's logits and boxes per route, in the layout ``MultiRouteCriterion`` takes.

    Args:
        outputs: :class:`~mrdetr.adapters.RouteOutputs` or
            :class:`~mrdetr.layers.MultiRouteDecoderOutput`: ``hidden_states
            (Tensor[N, R, B, Q, C])``, and optionally ``reference_points
            (Tensor[N, R, B, Q, 2 or 4])`` and ``boxes (Tensor[N, R, B, Q, 4])``.
            ``RouteOutputs.hidden_states`` already passed the decoder's final norm (DETR's
            ``decoder.norm``; :attr:`DecoderSpec.final_norm`), as the host's heads see them,
            so the primary route's predictions equal the model's own.
        class_heads: ``Tensor[..., C] -> Tensor[..., K]``, one shared or one per layer; called
            once per layer on every route at once (``Tensor[R, B, Q, C]``).
        box_heads: ``Tensor[..., C] -> Tensor[..., 4]``, one shared or one per layer (called like
            ``class_heads``); unused when ``outputs.boxes`` is given (refined boxes already
            computed).
        routes: the route set (default ``outputs.routes``).
        enc_outputs: two-stage encoder proposals ``{"pred_logits", "pred_boxes"}``, added to
            the primary route.

    Boxes: ``outputs.boxes`` if present; else with reference points
    ``sigmoid(box_head(h) + inverse_sigmoid(ref))`` (a 2-d reference shifts the centre only,
    as Deformable-DETR); else ``sigmoid(box_head(h))`` (DETR).

    Returns:
        ``{route name: {"pred_logits": Tensor[B, Q, K], "pred_boxes": Tensor[B, Q, 4],
        "aux_outputs": [{...} per earlier layer]}}``, primary first (+ ``enc_outputs``).
    """
    hidden = outputs.hidden_states
    routes = tuple(routes if routes is not None else outputs.routes)
    if hidden.dim() != 5 or hidden.shape[1] != len(routes):
        raise ValueError(
            f"outputs.hidden_states must be [N, R={len(routes)}, B, Q, C], "
            f"got {tuple(hidden.shape)}"
        )
    n = hidden.shape[0]
    boxes = getattr(outputs, "boxes", None)
    refs = getattr(outputs, "reference_points", None)
    cls = _per_layer(class_heads, n, "class_heads")
    if boxes is None:
        if box_heads is None:
            raise ValueError("box_heads must be given when outputs carry no refined boxes")
        heads = _per_layer(box_heads, n, "box_heads")
    per_layer = []  # every route at once: one head call per layer, [R, B, Q, ...]
    for i in range(n):
        h = hidden[i]  # [R, B, Q, C]
        if boxes is not None:
            b = boxes[i]
        elif refs is not None:
            delta, ref = heads[i](h), inverse_sigmoid(refs[i])
            if ref.shape[-1] == 2:  # centre only
                delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)
            else:
                delta = delta + ref
            b = delta.sigmoid()
        else:
            b = heads[i](h).sigmoid()
        per_layer.append((cls[i](h), b))
    result = {}
    for r, route in enumerate(routes):
        layers = [{"pred_logits": logits[r], "pred_boxes": b[r]} for logits, b in per_layer]
        result[route.name] = {**layers[-1], "aux_outputs": layers[:-1]}
    if enc_outputs is not None:
        result[routes[0].name]["enc_outputs"] = dict(enc_outputs)
    return result
