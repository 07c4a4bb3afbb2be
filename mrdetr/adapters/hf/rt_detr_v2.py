"""HF transformers ``RTDetrV2Decoder`` (inside ``RTDetrV2ForObjectDetection``): RT-DETR's decoder
design (only its deformable cross-attention samples differently, which the routes share), so
RT-DETR's integration with v2's class names."""

from __future__ import annotations

from .rt_detr import HFRTDetrIntegration

__all__ = ["HFRTDetrV2Integration"]


class HFRTDetrV2Integration(HFRTDetrIntegration):
    """``RTDetrV2Decoder``: as :class:`~mrdetr.adapters.hf.HFRTDetrIntegration` (denoising
    queries first, in the primary route only; refined boxes per layer; per-layer heads in the
    decoder)."""

    name = "transformers RTDetrV2Decoder"
    decoder_class = "RTDetrV2Decoder"
    detector_class = "RTDetrV2ForObjectDetection"
