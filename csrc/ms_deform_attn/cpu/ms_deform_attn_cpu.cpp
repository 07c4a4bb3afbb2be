// CPU kernels of mrdetr::ms_deform_attn_{forward,backward}.
//
// Forward is parallel over (batch, query): every output row is written by one thread.
// Backward is parallel over (batch, head): the value-gradient slice [b, :, h, :] belongs to one
// thread, which walks the queries in order, so the result is deterministic and race-free.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/gather.h"
#include "cpu/huge_pages.h"
#include "inputs.h"
#include "ms_deform_attn.h"

namespace mrdetr {
namespace {

struct Levels {
  std::vector<int64_t> height, width, start;
};

Levels read_levels(const OpInputs& in) {
  const int64_t* s = in.spatial_shapes.data_ptr<int64_t>();
  const int64_t* l = in.level_start_index.data_ptr<int64_t>();
  Levels lv;
  for (int64_t i = 0; i < in.L; ++i) {
    lv.height.push_back(s[2 * i]);
    lv.width.push_back(s[2 * i + 1]);
    lv.start.push_back(l[i]);
  }
  return lv;
}

cpu::LevelView view(const Levels& lv) {
  return {lv.height.data(), lv.width.data(), lv.start.data()};
}

// Forward: a thread's tasks are the (query, head) pairs of its rows, in order; the corners of
// task t + 1 are gathered before task t is accumulated, and prefetched while it is (gather.h).
template <typename scalar_t>
void forward_kernel(const OpInputs& in, const Levels& lv, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using Corner = cpu::Corner<scalar_t, acc_t>;
  const int64_t S = in.S, H = in.H, D = in.D, Q = in.Q, L = in.L, P = in.P;
  const scalar_t* v = in.value.data_ptr<scalar_t>();
  const scalar_t* lp = in.loc.data_ptr<scalar_t>();
  const scalar_t* ap = in.attn.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const cpu::LevelView levels = view(lv);
  at::parallel_for(0, in.B * Q, 16, [&](int64_t begin, int64_t end) {
    cpu::Pipeline<Corner> pipe(4 * L * P);
    const int64_t first = begin * H, last = end * H;  // tasks: flat (b, q, h) indices
    const auto gather = [&](int64_t task) {
      const scalar_t* vh = v + ((task / (Q * H)) * S * H + task % H) * D;  // value[b, 0, h, 0]
      pipe.next_size = cpu::gather_corners<scalar_t, acc_t>(lp, ap, task * L * P, levels, L, P,
                                                            vh, H * D, D, pipe.next.data());
    };
    gather(first);
    for (int64_t k = 0; k < pipe.next_size; ++k) cpu::prefetch_row<false>(pipe.next[k].row, D);
    for (int64_t task = first; task < last; ++task) {
      pipe.advance();
      if (task + 1 < last) gather(task + 1);
      cpu::accumulate<scalar_t, acc_t>(pipe.current.data(), pipe.current_size, pipe.next.data(),
                                       task + 1 < last ? pipe.next_size : 0, D, op + task * D);
    }
  });
}

// Backward: one thread owns the value-gradient slice [b, :, h, :] and walks the queries in
// order (deterministic, no atomics), one point at a time with the shared header's point_backward;
// while point k of query q runs, the value and value-gradient rows of point k of query q + 1
// are prefetched.
template <typename scalar_t>
void backward_kernel(const OpInputs& in, const at::Tensor& grad_out, const Levels& lv,
                     at::Tensor& grad_value_acc, at::Tensor& grad_loc, at::Tensor& grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = in.S, H = in.H, D = in.D, Q = in.Q, L = in.L, P = in.P;
  const scalar_t* v = in.value.data_ptr<scalar_t>();
  const scalar_t* g = grad_out.data_ptr<scalar_t>();
  const scalar_t* lp = in.loc.data_ptr<scalar_t>();
  const scalar_t* ap = in.attn.data_ptr<scalar_t>();
  acc_t* gv = grad_value_acc.data_ptr<acc_t>();
  scalar_t* glp = grad_loc.data_ptr<scalar_t>();
  scalar_t* gap = grad_attn.data_ptr<scalar_t>();
  const cpu::LevelView levels = view(lv);
  const auto add = [](acc_t* dst, acc_t x) { *dst += x; };
  at::parallel_for(0, in.B * H, 1, [&](int64_t begin, int64_t end) {
    cpu::Pipeline<cpu::Point<acc_t>> pipe(L * P);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t head = (b * S * H + h) * D;  // [b, 0, h, 0] in value / grad_value
      const auto gather = [&](int64_t q) {
        cpu::gather_points<scalar_t, acc_t>(lp, ap, ((b * Q + q) * H + h) * L * P, levels, L, P,
                                            pipe.next.data());
      };
      gather(0);
      for (int64_t k = 0; k < L * P; ++k) {
        cpu::prefetch_point(pipe.next[k], levels, v + head, gv + head, H * D, D);
      }
      for (int64_t q = 0; q < Q; ++q) {
        pipe.advance();
        if (q + 1 < Q) gather(q + 1);
        const int64_t row = (b * Q + q) * H + h;  // [b, q, h] in grad_out / points
        for (int64_t k = 0; k < L * P; ++k) {
          if (q + 1 < Q) cpu::prefetch_point(pipe.next[k], levels, v + head, gv + head, H * D, D);
          const auto& pt = pipe.current[k];
          const int64_t off = head + lv.start[pt.level] * H * D;
          acc_t gx, gy, ga;
          point_backward<scalar_t, acc_t>(v + off, gv + off, H * D, pt.bil, pt.attn,
                                          g + row * D, D, lv.height[pt.level],
                                          lv.width[pt.level], add, &gx, &gy, &ga);
          const int64_t i = row * L * P + k;
          glp[2 * i] = static_cast<scalar_t>(gx);
          glp[2 * i + 1] = static_cast<scalar_t>(gy);
          gap[i] = static_cast<scalar_t>(ga);
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const OpInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
  auto out = at::empty(in.output_sizes(), in.value.options());
  if (out.numel() == 0) return out;
  const Levels lv = read_levels(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(),
                                  "ms_deform_attn_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(in, lv, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const OpInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
  const auto grad = prepare_grad_output(grad_output, in);
  const auto acc_type = at::toOpMathType(in.value.scalar_type());
  auto grad_value_acc =
      cpu::zeros_advising_huge_pages(in.value.sizes(), in.value.options().dtype(acc_type));
  auto grad_loc = at::zeros_like(in.loc);
  auto grad_attn = at::zeros_like(in.attn);
  if (in.attn.numel() > 0 && in.value.numel() > 0) {
    const Levels lv = read_levels(in);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
          backward_kernel<scalar_t>(in, grad, lv, grad_value_acc, grad_loc, grad_attn);
        });
  }
  return {grad_value_acc.to(in.value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(mrdetr, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace mrdetr
