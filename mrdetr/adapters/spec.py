"""``DecoderSpec``: point the adapter at the sub-modules of a decoder it does not recognise.

A spec names, relative to the decoder, where its layers are, and in each layer the
self-attention (called like ``nn.MultiheadAttention``), the norm after it and the FFN (one
module or its linears); the decoder's final norm; and which ``forward`` arguments carry
queries. For example the original DETR decoder (sequence-first, ``forward(tgt, memory, ...,
pos, query_pos)``, returning every layer stacked ``[N, Q, B, C]`` after its ``norm``)::

    spec = DecoderSpec(
        decoder="transformer.decoder", layers="layers", self_attn="self_attn",
        self_attn_norm="norm1", ffn=("linear1", "linear2"), final_norm="norm",
        query_inputs={"tgt": 0, "query_pos": 0}, batch_first=False, output_query_dim=1,
    )
    wrap(model, spec=spec)

Every field is checked when :func:`~mrdetr.adapters.wrap` runs and on every training call
(:mod:`mrdetr.adapters.spec_checks`): a mistake raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..routing import RouteLayout, split, tile
from .integration import QueryTilingIntegration, RoutePass
from .packing import MHACall
from .route_modules import LayerModules
from .spec_checks import check_output, check_query_inputs, check_spec

__all__ = ["DecoderSpec", "SpecIntegration", "resolve"]


@dataclass(frozen=True)
class DecoderSpec:
    """Where the route mechanism finds a decoder's sub-modules (dotted attribute paths).

    Attributes:
        layers: path from the decoder to its layers (an iterable of modules), e.g. ``"layers"``.
        self_attn, self_attn_norm, ffn: paths inside each layer: the self-attention
            (``nn.MultiheadAttention`` call convention), the norm after it (before it when
            pre-norm), the FFN (a module path or a tuple of its linears' paths).
        decoder: path from the model given to :func:`~mrdetr.adapters.wrap` to the decoder
            (``""``: the model is the decoder).
        query_inputs: ``forward`` argument name -> its query axis, for every argument holding
            one entry per query (queries, query positions, query masks); tiled per route. The
            first entry is the queries themselves (its axis is the layers' query axis).
        batch_first: the layers' hidden states are ``[B, Q, C]`` (else ``[Q, B, C]``).
        output_query_dim: query axis of the tensors the decoder returns (None: like the layers').
        final_norm: path from the decoder to the norm its outputs pass before the heads,
            applied to every layer's output in :class:`~mrdetr.adapters.RouteOutputs`
            ``.hidden_states`` (DETR's ``return_intermediate`` normalises every layer's output
            with it), so ``route_predictions`` of the primary route equal the model's own.
            ``"auto"`` (default): the decoder's ``norm`` attribute when it is a module (DETR,
            Conditional / DAB-DETR, ``nn.TransformerDecoder``), else none; ``None``: no final
            norm (the hidden states as the layers return them).
        ffn_norm: deprecated and unused (the FFN's norm is always shared by the routes);
            passing it warns with ``DeprecationWarning``.
    """

    layers: str
    self_attn: str
    self_attn_norm: str
    ffn: str | tuple[str, ...]
    ffn_norm: str | None = None
    decoder: str = ""
    query_inputs: Mapping[str, int] = field(default_factory=lambda: {"tgt": 1})
    batch_first: bool = True
    output_query_dim: int | None = None
    final_norm: str | None = "auto"

    def __post_init__(self) -> None:
        if self.ffn_norm is not None:
            warnings.warn(
                "DecoderSpec.ffn_norm is unused (the FFN's norm is shared by every route) and "
                "will be removed; leave it out",
                DeprecationWarning,
                stacklevel=3,
            )


def resolve(root: nn.Module, path: str, what: str) -> nn.Module:
    """``root.<path>`` (dotted; ``""`` is ``root``), or ``ValueError`` naming what is there."""
    obj = root
    for part in filter(None, path.split(".")):
        if not hasattr(obj, part):
            names = [n for n, _ in obj.named_children()] if isinstance(obj, nn.Module) else []
            raise ValueError(
                f"spec.{what}: {type(obj).__name__} has no attribute {part!r} (path {path!r}); "
                f"its sub-modules are {names}"
            )
        obj = getattr(obj, part)
    return obj


def _map_tensors(x, fn):
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


class SpecIntegration(QueryTilingIntegration):
    """:class:`~mrdetr.adapters.integration.QueryTilingIntegration` driven by a
    :class:`DecoderSpec` (no denoising queries; tensors returned as a tensor or tuple/list)."""

    name = "explicit spec"

    def __init__(self, spec: DecoderSpec) -> None:
        if not isinstance(spec, DecoderSpec):
            raise TypeError(f"spec must be a DecoderSpec, got {type(spec).__name__}")
        self.spec = spec

    def spec_for(self, decoder: nn.Module) -> DecoderSpec:
        """The spec of ``decoder`` (subclasses may derive it from the decoder)."""
        return self.spec

    def find_decoder(self, model: nn.Module) -> nn.Module:
        return resolve(model, self.spec.decoder, "decoder")

    def layer_modules(self, decoder: nn.Module) -> list[LayerModules]:
        s = self.spec_for(decoder)
        layers = list(resolve(decoder, s.layers, "layers"))
        if not layers:
            raise ValueError(f"spec.layers: {s.layers!r} holds no layers")
        ffn = (s.ffn,) if isinstance(s.ffn, str) else tuple(s.ffn)
        return [
            LayerModules(
                layer,
                resolve(layer, s.self_attn, "self_attn"),
                resolve(layer, s.self_attn_norm, "self_attn_norm"),
                tuple(resolve(layer, p, "ffn") for p in ffn),
            )
            for layer in layers
        ]

    def final_norm(self, decoder: nn.Module) -> nn.Module | None:
        """The module ``spec.final_norm`` names (``"auto"``: ``decoder.norm`` if a module)."""
        path = self.spec_for(decoder).final_norm
        if path == "auto":
            norm = getattr(decoder, "norm", None)
            return norm if isinstance(norm, nn.Module) else None
        return None if path is None else resolve(decoder, path, "final_norm")

    def check_routes(self, decoder: nn.Module, plan) -> None:
        """The routes, as :meth:`Integration.check_routes`, then the spec's dry run on
        ``decoder`` (:func:`~mrdetr.adapters.spec_checks.check_spec`): ``ValueError`` naming
        the first wrong field."""
        super().check_routes(decoder, plan)
        spec = self.spec_for(decoder)
        check_spec(spec, decoder, self.layer_modules(decoder), self.final_norm(decoder))

    def layer_hidden(self, decoder: nn.Module, layer_output) -> Tensor:
        norm = self.final_norm(decoder)
        return layer_output if norm is None else norm(layer_output)

    def attention_call(self, host: LayerModules) -> MHACall:
        return MHACall(self.spec.batch_first)

    def query_dim(self, decoder: nn.Module) -> int:
        return 1 if self.spec_for(decoder).batch_first else 0

    def _bind(self, decoder, args, kwargs) -> inspect.BoundArguments:
        forward = type(decoder).forward
        return inspect.signature(forward).bind(decoder, *args, **kwargs)

    def tile_inputs(self, decoder, args, kwargs, num_routes) -> RoutePass:
        bound = self._bind(decoder, args, kwargs)
        spec = self.spec_for(decoder)
        dims = spec.query_inputs
        q = check_query_inputs(spec, bound.arguments)
        layout = RouteLayout(num_routes, q, 0, self.query_dim(decoder))
        for name, dim in dims.items():
            if bound.arguments.get(name) is not None:
                bound.arguments[name] = tile(bound.arguments[name], layout, dim)
        return RoutePass(layout, bound.args[1:], bound.kwargs)

    def split_outputs(self, decoder, output, route_pass: RoutePass):
        layout = route_pass.layout
        dim = self.spec_for(decoder).output_query_dim
        dim = layout.query_dim if dim is None else dim
        tensors: list[Tensor] = []
        _map_tensors(output, tensors.append)
        check_output(self.spec_for(decoder), tensors, dim, layout.length)
        fits = lambda t: t.dim() > dim and t.shape[dim] == layout.length  # noqa: E731
        primary = _map_tensors(output, lambda t: split(t, layout, dim)[0] if fits(t) else t)
        aux = {
            r.name: _map_tensors(output, lambda t, i=i: split(t, layout, dim)[i] if fits(t) else t)
            for i, r in enumerate(self._routes(decoder)[1:], start=1)
        }
        return primary, aux

    @staticmethod
    def _routes(decoder):
        return decoder.mrdetr_routes.routes
