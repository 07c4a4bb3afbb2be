// Schema of the mrdetr::ms_deform_attn ops, defined once. Kernels register per device in
// cpu/ms_deform_attn_cpu.cpp and cuda/ms_deform_attn_cuda.cu; the fake (meta) kernels and the
// autograd formula are registered from Python (mrdetr/ops/_library.py).
#include <torch/library.h>

TORCH_LIBRARY(mrdetr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}
