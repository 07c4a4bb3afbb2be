// Argument checks and contiguous inputs shared by the CPU and CUDA kernels. The shape and dtype
// checks are a safety net for direct calls to torch.ops.mrdetr.* (the Python wrapper raises
// clearer errors first). Nothing here copies from the device: the bounds safety of the kernels
// does not depend on any host check (ms_deform_attn.h, safe_level). Level tensors that already
// live on the host (CPU inputs) are also checked here, at no transfer cost, so that a bad direct
// CPU call raises ValueError instead of sampling zeros.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

#include "ms_deform_attn.h"

namespace mrdetr {

// The op's inputs made contiguous, with their sizes:
// value [B, S, H, D], sampling_locations [B, Q, H, L, P, 2], attention_weights [B, Q, H, L, P].
struct OpInputs {
  at::Tensor value, spatial_shapes, level_start_index, loc, attn;
  int64_t B, S, H, D, Q, L, P;

  std::vector<int64_t> output_sizes() const { return {B, Q, H * D}; }
};

// Host level tensors only (never a device copy): every level must lie inside value's S
// positions, the same predicate (level_fits) the kernels apply. Raises ValueError in Python.
inline void check_host_levels(const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, int64_t S) {
  if (!spatial_shapes.device().is_cpu() || !level_start_index.device().is_cpu()) return;
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const int64_t* sp = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    const int64_t h = sp[2 * l], w = sp[2 * l + 1], start = st[l];
    TORCH_CHECK_VALUE(h > 0 && w > 0, "ms_deform_attn: spatial_shapes must be positive, level ",
                      l, " is (", h, ", ", w, ")");
    TORCH_CHECK_VALUE(level_fits(start, h, w, S),
                      "ms_deform_attn: level ", l, " (start ", start, ", shape (", h, ", ", w,
                      ")) does not fit in value's S=", S,
                      " positions: need 0 <= start and start + h*w <= S");
  }
}

inline OpInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index,
                               const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be [B, S, H, D], got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "spatial_shapes must be [L, 2], got ", spatial_shapes.sizes());
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(levels > 0, "ms_deform_attn: spatial_shapes must have at least one level (L >= 1), got L=0");
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
              "level_start_index must be [L], got ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == value.size(0) &&
                  sampling_locations.size(2) == value.size(2) &&
                  sampling_locations.size(3) == levels && sampling_locations.size(5) == 2,
              "sampling_locations must be [B, Q, H, L, P, 2], got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must be [B, Q, H, L, P], got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "value, sampling_locations and attention_weights must share one dtype");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations,
                              &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "all inputs must be on value's device ",
                value.device(), ", got ", t->device());
  }
  check_host_levels(spatial_shapes, level_start_index, value.size(1));
  OpInputs in{value.contiguous(),
              spatial_shapes.contiguous(),
              level_start_index.contiguous(),
              sampling_locations.contiguous(),
              attention_weights.contiguous(),
              value.size(0),
              value.size(1),
              value.size(2),
              value.size(3),
              sampling_locations.size(1),
              levels,
              sampling_locations.size(4)};
  return in;
}

inline at::Tensor prepare_grad_output(const at::Tensor& grad_output, const OpInputs& in) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(in.output_sizes()),
              "grad_output must be [B, Q, H*D], got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == in.value.scalar_type() &&
                  grad_output.device() == in.value.device(),
              "grad_output must have value's dtype and device");
  return grad_output.contiguous();
}

}  // namespace mrdetr
