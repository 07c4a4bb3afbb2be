// CUDA kernels of mrdetr::ms_deform_attn_{forward,backward}. The per-point math is the same
// inline code the CPU kernel runs (ms_deform_attn.h).
//
// Forward: one thread per output element (b, q, h, d), so neighbouring threads read
// neighbouring channels. Backward: one thread per sampling point (b, q, h, l, p); the value
// gradient is accumulated with atomicAdd into an fp32 (fp64 for double) buffer. The level
// tensors are read on the device only, through safe_level (ms_deform_attn.h): no host copy, and
// no read outside `value` whatever they hold.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "inputs.h"
#include "ms_deform_attn.h"

namespace mrdetr {
namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 30);
}

struct AtomicAdd {
  template <typename T>
  __device__ __forceinline__ void operator()(T* dst, T x) const { atomicAdd(dst, x); }
};

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                               scalar_t* __restrict__ out, int64_t B, int64_t S, int64_t Q,
                               int64_t H, int64_t D, int64_t L, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = B * Q * H * D;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t d = idx % D;
    const int64_t bqh = idx / D;  // [b, q, h]
    const int64_t h = bqh % H;
    const int64_t b = bqh / (H * Q);
    acc_t acc = acc_t(0);
    for (int64_t l = 0; l < L; ++l) {
      const Level lv = safe_level(starts[l], shapes[2 * l], shapes[2 * l + 1], S);
      const scalar_t* vl = value + ((b * S + lv.start) * H + h) * D;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t i = (bqh * L + l) * P + p;
        const auto bil = bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]),
                                         static_cast<acc_t>(loc[2 * i + 1]), lv.height, lv.width);
        acc += static_cast<acc_t>(attn[i]) * sample_channel<scalar_t, acc_t>(vl, H * D, bil, d);
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc,
                                const scalar_t* __restrict__ attn,
                                at::opmath_type<scalar_t>* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn,
                                int64_t B, int64_t S, int64_t Q, int64_t H, int64_t D, int64_t L,
                                int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = B * Q * H * L * P;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t l = (i / P) % L;
    const int64_t bqh = i / (L * P);  // [b, q, h]
    const int64_t h = bqh % H;
    const int64_t b = bqh / (H * Q);
    const Level lv = safe_level(starts[l], shapes[2 * l], shapes[2 * l + 1], S);
    const int64_t height = lv.height, width = lv.width;
    const int64_t off = ((b * S + lv.start) * H + h) * D;
    const auto bil = bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]),
                                     static_cast<acc_t>(loc[2 * i + 1]), height, width);
    acc_t gx, gy, ga;
    point_backward<scalar_t, acc_t>(value + off, grad_value + off, H * D, bil,
                                    static_cast<acc_t>(attn[i]), grad_out + bqh * D, D, height,
                                    width, AtomicAdd{}, &gx, &gy, &ga);
    grad_loc[2 * i] = static_cast<scalar_t>(gx);
    grad_loc[2 * i + 1] = static_cast<scalar_t>(gy);
    grad_attn[i] = static_cast<scalar_t>(ga);
  }
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const OpInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
  auto out = at::empty(in.output_sizes(), in.value.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        forward_kernel<scalar_t><<<num_blocks(out.numel()), kThreads, 0, stream>>>(
            in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
            in.level_start_index.data_ptr<int64_t>(), in.loc.data_ptr<scalar_t>(),
            in.attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), in.B, in.S, in.Q, in.H,
            in.D, in.L, in.P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const OpInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
  const auto grad = prepare_grad_output(grad_output, in);
  const auto acc_type = at::toOpMathType(in.value.scalar_type());
  auto grad_value = at::zeros(in.value.sizes(), in.value.options().dtype(acc_type));
  auto grad_loc = at::zeros_like(in.loc);
  auto grad_attn = at::zeros_like(in.attn);
  if (in.attn.numel() > 0 && in.value.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          backward_kernel<scalar_t><<<num_blocks(in.attn.numel()), kThreads, 0, stream>>>(
              grad.data_ptr<scalar_t>(), in.value.data_ptr<scalar_t>(),
              in.spatial_shapes.data_ptr<int64_t>(), in.level_start_index.data_ptr<int64_t>(),
              in.loc.data_ptr<scalar_t>(), in.attn.data_ptr<scalar_t>(),
              grad_value.data_ptr<at::opmath_type<scalar_t>>(), grad_loc.data_ptr<scalar_t>(),
              grad_attn.data_ptr<scalar_t>(), in.B, in.S, in.Q, in.H, in.D, in.L, in.P);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_value.to(in.value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(mrdetr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace mrdetr
