"""Mr. DETR's training routes (``wrap`` / ``unwrap``) and mrdetr's kernels on decoders from other
codebases.

See ``docs/integrations.md``. Supported families are :class:`Integration` instances in a
registry (:func:`register_integration`): torch ``nn.TransformerDecoder``, mrdetr's
``MultiRouteDecoder``, the original Deformable-DETR decoder and HF transformers' DETR families
(:mod:`mrdetr.adapters.hf`) built in; any other decoder through an explicit :class:`DecoderSpec`.
The route mechanism itself (plan, packing, owned modules, instructive attention) is
:mod:`mrdetr.routing`.
"""

from ..routing import RouteLayout
from . import hf
from .deformable_detr import DeformableDetrIntegration
from .fast_attention import restore_deformable_attention, use_fast_deformable_attention
from .hf import (
    HFConditionalDetrIntegration,
    HFDabDetrIntegration,
    HFDecoderIntegration,
    HFDeformableDetrIntegration,
    HFGroundingDinoIntegration,
    HFLwDetrIntegration,
    HFOmDetTurboIntegration,
    HFRfDetrIntegration,
    HFRTDetrIntegration,
    hf_route_predictions,
)
from .hf.detr import HFDetrIntegration
from .integration import (
    Integration,
    QueryTilingIntegration,
    RouteOutputs,
    RoutePass,
    register_integration,
    registered_integrations,
)
from .mrdetr_decoder import MultiRouteDecoderIntegration
from .packing import MHACall
from .predictions import route_predictions
from .route_modules import LayerModules, RouteModules
from .spec import DecoderSpec, SpecIntegration
from .torch_decoder import TorchDecoderIntegration
from .wrap import is_wrapped, route_outputs, unwrap, wrap

register_integration(TorchDecoderIntegration())
register_integration(MultiRouteDecoderIntegration())
register_integration(HFDeformableDetrIntegration())
register_integration(HFRTDetrIntegration())
register_integration(DeformableDetrIntegration())
register_integration(HFDetrIntegration("DetrDecoder", "DetrForObjectDetection"))
register_integration(
    HFDetrIntegration("TableTransformerDecoder", "TableTransformerForObjectDetection")
)
register_integration(HFConditionalDetrIntegration())
register_integration(HFDabDetrIntegration())
register_integration(hf.HFRTDetrV2Integration())
register_integration(hf.HFDFineIntegration())
register_integration(hf.HFDeimv2Integration())
register_integration(HFLwDetrIntegration())
register_integration(HFRfDetrIntegration())
register_integration(HFGroundingDinoIntegration("GroundingDino"))
register_integration(HFGroundingDinoIntegration("MMGroundingDino"))
register_integration(HFOmDetTurboIntegration())

__all__ = [
    "DecoderSpec",
    "DeformableDetrIntegration",
    "HFDecoderIntegration",
    "HFDeformableDetrIntegration",
    "HFRTDetrIntegration",
    "Integration",
    "LayerModules",
    "MHACall",
    "MultiRouteDecoderIntegration",
    "QueryTilingIntegration",
    "RouteLayout",
    "RouteModules",
    "RouteOutputs",
    "RoutePass",
    "SpecIntegration",
    "TorchDecoderIntegration",
    "hf_route_predictions",
    "is_wrapped",
    "register_integration",
    "registered_integrations",
    "restore_deformable_attention",
    "route_outputs",
    "route_predictions",
    "unwrap",
    "use_fast_deformable_attention",
    "wrap",
    "HFGroundingDinoIntegration",
    "HFOmDetTurboIntegration",
]
