// CPU kernels of mrdetr::ms_deform_attn_{forward,backward}.
//
// Forward is parallel over (batch, query): every output row is written by one thread.
// Backward is parallel over (batch, query, head) ranges for the location and weight gradients,
// then over chunks of pixels for the value gradient (value_grad.h): every value-gradient row is
// filled by one thread in (query, point, corner) order, so the result is race-free and bitwise
// identical across runs and thread counts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/gather.h"
#include "cpu/huge_pages.h"
#include "cpu/value_grad.h"
#include "inputs.h"
#include "ms_deform_attn.h"

namespace mrdetr {
namespace {

struct Levels {
  std::vector<int64_t> height, width, start;
};

// The levels through safe_level (ms_deform_attn.h): a level outside value reads nothing.
Levels read_levels(const OpInputs& in) {
  const int64_t* s = in.spatial_shapes.data_ptr<int64_t>();
  const int64_t* l = in.level_start_index.data_ptr<int64_t>();
  Levels lv;
  for (int64_t i = 0; i < in.L; ++i) {
    const Level safe = safe_level(l[i], s[2 * i], s[2 * i + 1], in.S);
    lv.height.push_back(safe.height);
    lv.width.push_back(safe.width);
    lv.start.push_back(safe.start);
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

// Backward phase 1 (value_grad.h) for tasks (flat (b, q, h) indices) [first, last): split into
// `parts` contiguous ranges, one per thread. A part walks its tasks in order, one point at a
// time: the dot products of grad_output with the point's corner rows give its location and
// weight gradients (the shared header's point_gradients), and each in-map corner's
// value-gradient update is recorded for phase 2. While point k of task t runs, the value rows of
// point k of task t + 1 are prefetched.
template <typename scalar_t, typename acc_t>
void backward_points(const OpInputs& in, const scalar_t* g, const Levels& lv, int64_t first,
                     int64_t last, int64_t parts, cpu::UpdateLists<acc_t>& updates, scalar_t* glp,
                     scalar_t* gap) {
  const int64_t S = in.S, H = in.H, D = in.D, Q = in.Q, L = in.L, P = in.P;
  const scalar_t* v = in.value.data_ptr<scalar_t>();
  const scalar_t* lp = in.loc.data_ptr<scalar_t>();
  const scalar_t* ap = in.attn.data_ptr<scalar_t>();
  const cpu::LevelView levels = view(lv);
  const auto head_of = [&](int64_t task) {  // value[b, 0, h, 0]
    return v + ((task / (Q * H)) * S * H + task % H) * D;
  };
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    cpu::Pipeline<cpu::Point<acc_t>> pipe(L * P);
    for (int64_t part = part_begin; part < part_end; ++part) {
      const int64_t t0 = first + (last - first) * part / parts;
      const int64_t t1 = first + (last - first) * (part + 1) / parts;
      if (t0 == t1) continue;
      const auto gather = [&](int64_t task) {
        cpu::gather_points<scalar_t, acc_t>(lp, ap, task * L * P, levels, L, P, pipe.next.data());
      };
      gather(t0);
      const scalar_t* next_head = head_of(t0);
      for (int64_t k = 0; k < L * P; ++k) {
        cpu::prefetch_point(pipe.next[k], levels, next_head, H * D, D);
      }
      for (int64_t task = t0; task < t1; ++task) {
        pipe.advance();
        const bool more = task + 1 < t1;
        const scalar_t* vh = next_head;
        if (more) {
          gather(task + 1);
          next_head = head_of(task + 1);
        }
        const int64_t b = task / (Q * H), h = task % H;
        const scalar_t* gt = g + task * D;  // grad_output[b, q, h, :]
        for (int64_t k = 0; k < L * P; ++k) {
          if (more) cpu::prefetch_point(pipe.next[k], levels, next_head, H * D, D);
          const auto& pt = pipe.current[k];
          const int64_t i = task * L * P + k;
          acc_t gx, gy, ga;
          if (!pixelless_point_gradients(pt.bil, &gx, &gy, &ga)) {
            acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
            for (int c = 0; c < 4; ++c) {
              if (pt.bil.offset[c] < 0) continue;
              const int64_t pixel = lv.start[pt.level] + pt.bil.offset[c];
              dot[c] = cpu::dot<scalar_t, acc_t>(gt, vh + pixel * H * D, D);
              updates.add(part, b, pixel, h, task, pt.attn * pt.bil.weight[c]);
            }
            point_gradients(pt.bil, pt.attn, dot, lv.height[pt.level], lv.width[pt.level], &gx,
                            &gy, &ga);
          }
          glp[2 * i] = static_cast<scalar_t>(gx);
          glp[2 * i + 1] = static_cast<scalar_t>(gy);
          gap[i] = static_cast<scalar_t>(ga);
        }
      }
    }
  });
}

// Backward: in waves of tasks (bounding the recorded updates to kWaveUpdates), phase 1 (points)
// then phase 2 (value_grad.h: the value gradient chunk by chunk).
template <typename scalar_t>
void backward_kernel(const OpInputs& in, const at::Tensor& grad_out, const Levels& lv,
                     at::Tensor& grad_value_acc, at::Tensor& grad_loc, at::Tensor& grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_out.data_ptr<scalar_t>();
  const cpu::ChunkGrid grid(in.B, in.S, in.H, in.D * static_cast<int64_t>(sizeof(acc_t)));
  const int64_t tasks = in.B * in.Q * in.H;
  const int64_t per_task = 4 * in.L * in.P;  // updates of one task, at most
  const int64_t wave = std::max<int64_t>(1, cpu::kWaveUpdates / std::max<int64_t>(1, per_task));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t first = 0;
  do {
    const int64_t last = std::min(tasks, first + wave);
    const int64_t parts = std::max<int64_t>(1, std::min(threads, last - first));
    const int64_t capacity = ((last - first + parts - 1) / parts) * per_task;
    cpu::UpdateLists<acc_t> updates(parts, capacity, grid);
    backward_points<scalar_t, acc_t>(in, g, lv, first, last, parts, updates,
                                     grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>());
    cpu::fill_value_grad<scalar_t, acc_t>(updates, grid, first == 0, g, in.D,
                                          grad_value_acc.data_ptr<acc_t>());
    first = last;
  } while (first < tasks);
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const OpInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
  auto out = at::empty(in.output_sizes(), in.value.options());
  if (out.numel() == 0) return out;
  // prepare_inputs checked these host levels: at least one fits, so S >= 1 and the NaN marker
  // of gather_corners (pixel 0 of a level) lies inside value.
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
      cpu::empty_advising_huge_pages(in.value.sizes(), in.value.options().dtype(acc_type));
  auto grad_loc = at::empty_like(in.loc);
  auto grad_attn = at::empty_like(in.attn);
  if (in.value.numel() > 0) {  // writes every element (phase 2 zeroes grad_value even with Q = 0)
    const Levels lv = read_levels(in);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
          backward_kernel<scalar_t>(in, grad, lv, grad_value_acc, grad_loc, grad_attn);
        });
  } else {  // D = 0 (or an empty batch / map): points exist, but no value to read
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return {grad_value_acc.to(in.value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(mrdetr, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace mrdetr
