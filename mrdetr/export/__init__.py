"""Export for deployment: ``torch.export`` and ONNX of models that use ``mrdetr``'s op.

``torch.export.export`` works directly (the op has fake kernels); ONNX needs the op's lowering
to standard ONNX ops, which :func:`export_onnx` registers. Importing this module needs no ONNX
package; exporting to ONNX needs ``onnx`` and ``onnxscript`` (``pip install 'mrdetr[export]'``).
See ``docs/deploy.md``.
"""

from ._onnx import MIN_OPSET, export_onnx, ms_deform_attn_onnx, onnx_translation_table

__all__ = ["MIN_OPSET", "export_onnx", "ms_deform_attn_onnx", "onnx_translation_table"]
