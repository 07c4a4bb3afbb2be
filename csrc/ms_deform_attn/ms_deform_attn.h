// Multi-scale deformable attention: the per-point math shared by the CPU and CUDA kernels.
//
// Every function here is inline and __host__ __device__, so the CPU kernel (tested on every
// development machine) runs exactly the code the CUDA kernel runs on a GPU. Values are read as
// scalar_t and accumulated in acc_t (float for half/bfloat16, else scalar_t).
//
// Layout: `v` points at value[b, level_start, h, 0]; a pixel (y, x) of the level lives at
// v + (y * width + x) * pixel_stride, with pixel_stride = H * D (value is [B, S, H, D]).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define MRDETR_HD __host__ __device__ __forceinline__
#else
#define MRDETR_HD inline
#endif

// Channel loops are vectorised on the CPU: `omp simd` lets the compiler reorder the float
// reduction of the backward dot products (the order is still fixed, so results stay
// deterministic). CUDA runs one channel loop per thread and ignores this.
#if defined(_OPENMP) && !defined(__CUDACC__)
#define MRDETR_SIMD _Pragma("omp simd")
#define MRDETR_SIMD_SUM_S _Pragma("omp simd reduction(+ : s)")  // sums into `s`
#else
#define MRDETR_SIMD
#define MRDETR_SIMD_SUM_S
#endif

namespace mrdetr {

MRDETR_HD float floor_(float x) { return floorf(x); }
MRDETR_HD double floor_(double x) { return ::floor(x); }

// Non-finite input (one rule for every backend, the PyTorch reference included):
// - a NaN location or a NaN attention weight makes that point's sample NaN, so the output row
//   [b, q, h, :] is NaN and so are the point's location and weight gradients (the point adds
//   nothing to the value gradient when its location is NaN);
// - a location outside the map that is not NaN (+-inf and huge finite values included) samples
//   zeros with zero location gradient. Coordinates are compared in floating point before any
//   conversion to an integer, so no value of loc is undefined behaviour;
// - a NaN in value reaches every output that reads that pixel (IEEE arithmetic).
// Kernels get this by building points with bilinear() and summing them with point_backward /
// sample_channel; a kernel with loops of its own checks nan_point() per point.
template <typename acc_t>
MRDETR_HD acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename acc_t>
MRDETR_HD bool is_nan(acc_t x) {
  return x != x;
}

// Bounds safety (one rule for every kernel). The host does not have to check the level
// tensors: a caller may pass any spatial_shapes / level_start_index (torch.ops.mrdetr.* called
// directly, a stale host list, a write through .data) and no kernel reads outside `value`.
// Every kernel takes a level's geometry through safe_level(): a level that does not lie wholly
// inside value's S positions becomes an empty level (height = width = 0, start = 0), whose
// points read no pixel and sample zeros. For a level that fits, every corner bilinear() returns
// is a pixel y * width + x with 0 <= y < height, 0 <= x < width, so start + offset < start +
// height * width <= S: each corner read stays inside value[b, :, h, :].
struct Level {
  int64_t start, height, width;
};

// h > 0, w > 0, 0 <= start and start + h * w <= S, written without overflow.
MRDETR_HD bool level_fits(int64_t start, int64_t height, int64_t width, int64_t S) {
  return height > 0 && width > 0 && start >= 0 && start <= S && height <= S - start &&
         width <= (S - start) / height;
}

MRDETR_HD Level safe_level(int64_t start, int64_t height, int64_t width, int64_t S) {
  if (level_fits(start, height, width, S)) return {start, height, width};
  return {0, 0, 0};
}

// The four bilinear corners of one sampling point on one level (zero padding).
template <typename acc_t>
struct Bilinear {
  int64_t offset[4];  // pixel index y * width + x of corners (y0,x0) (y0,x1) (y1,x0) (y1,x1); -1 = outside
  acc_t weight[4];    // bilinear weight of each corner
  acc_t lx, ly;       // fractional position inside the cell, for gradients
  bool nan;           // the location is NaN: the sample is NaN (every offset is -1)
};

// Pixel coordinates follow grid_sample(align_corners=False): x = loc_x * width - 0.5.
// Points with x <= -1, x >= width (same for y, +-inf included) touch no pixel: every offset is
// -1. A NaN location touches no pixel either and sets `nan`. An empty level (safe_level) has
// no pixel: every offset is -1.
template <typename acc_t>
MRDETR_HD Bilinear<acc_t> bilinear(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width) {
  Bilinear<acc_t> b;
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  b.nan = is_nan(loc_x) || is_nan(loc_y);
  if (!(height > 0 && width > 0 && x > acc_t(-1) && y > acc_t(-1) &&
        x < static_cast<acc_t>(width) && y < static_cast<acc_t>(height))) {
    for (int c = 0; c < 4; ++c) {
      b.offset[c] = -1;
      b.weight[c] = acc_t(0);
    }
    b.lx = b.ly = acc_t(0);
    return b;
  }
  const acc_t x0f = floor_(x), y0f = floor_(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  b.lx = x - x0f;
  b.ly = y - y0f;
  const acc_t hx = acc_t(1) - b.lx, hy = acc_t(1) - b.ly;
  const bool in_x0 = x0 >= 0, in_x1 = x0 + 1 < width, in_y0 = y0 >= 0, in_y1 = y0 + 1 < height;
  b.offset[0] = (in_y0 && in_x0) ? y0 * width + x0 : -1;
  b.offset[1] = (in_y0 && in_x1) ? y0 * width + x0 + 1 : -1;
  b.offset[2] = (in_y1 && in_x0) ? (y0 + 1) * width + x0 : -1;
  b.offset[3] = (in_y1 && in_x1) ? (y0 + 1) * width + x0 + 1 : -1;
  b.weight[0] = hy * hx;
  b.weight[1] = hy * b.lx;
  b.weight[2] = b.ly * hx;
  b.weight[3] = b.ly * b.lx;
  return b;
}

// A point whose weighted sample is NaN whatever the map holds: NaN location or NaN weight
// (a NaN weight times an outside point's zero sample is NaN too).
template <typename acc_t>
MRDETR_HD bool nan_point(const Bilinear<acc_t>& b, acc_t attn) {
  return b.nan || is_nan(attn);
}

// One channel of one sample: sum over in-bounds corners of weight * value.
template <typename scalar_t, typename acc_t>
MRDETR_HD acc_t sample_channel(const scalar_t* v, int64_t pixel_stride, const Bilinear<acc_t>& b,
                               int64_t d) {
  if (b.nan) return quiet_nan<acc_t>();
  acc_t s = acc_t(0);
  for (int c = 0; c < 4; ++c) {
    if (b.offset[c] >= 0) s += b.weight[c] * static_cast<acc_t>(v[b.offset[c] * pixel_stride + d]);
  }
  return s;
}

// The gradients of a point that reads no pixel: NaN for a NaN location, zero for a point wholly
// outside the map (even with a NaN weight). Returns false, writing nothing, when at least one
// corner is in the map (the gradients then come from point_gradients).
template <typename acc_t>
MRDETR_HD bool pixelless_point_gradients(const Bilinear<acc_t>& b, acc_t* grad_loc_x,
                                         acc_t* grad_loc_y, acc_t* grad_attn) {
  if (b.nan) {
    *grad_loc_x = *grad_loc_y = *grad_attn = quiet_nan<acc_t>();
    return true;
  }
  if (b.offset[0] < 0 && b.offset[1] < 0 && b.offset[2] < 0 && b.offset[3] < 0) {
    *grad_loc_x = *grad_loc_y = *grad_attn = acc_t(0);
    return true;
  }
  return false;
}

// Location and weight gradients of a point from dot[c] = <g, v_c> for its corners (0 for the
// corners outside the map).
template <typename acc_t>
MRDETR_HD void point_gradients(const Bilinear<acc_t>& b, acc_t attn, const acc_t* dot,
                               int64_t height, int64_t width, acc_t* grad_loc_x,
                               acc_t* grad_loc_y, acc_t* grad_attn) {
  const acc_t hx = acc_t(1) - b.lx, hy = acc_t(1) - b.ly;
  *grad_attn = b.weight[0] * dot[0] + b.weight[1] * dot[1] + b.weight[2] * dot[2] +
               b.weight[3] * dot[3];
  *grad_loc_x = attn * static_cast<acc_t>(width) *
                (hy * (dot[1] - dot[0]) + b.ly * (dot[3] - dot[2]));
  *grad_loc_y = attn * static_cast<acc_t>(height) *
                (hx * (dot[2] - dot[0]) + b.lx * (dot[3] - dot[1]));
}

// Backward of one sampling point over its D channels, given g = grad_output[b, q, h, 0:D].
//   grad_value[corner c, d] += attn * weight_c * g[d]           (through `add`, so the CUDA
//                                                                 kernel can add atomically)
//   grad_attn = sum_c weight_c * <g, v_c>
//   grad_loc  = attn * d(sum_c weight_c <g, v_c>)/d(loc), with dx/dloc_x = width, dy/dloc_y = height
// The per-corner dot products <g, v_c> carry everything the location and weight gradients need.
// A NaN location gives NaN location and weight gradients and no value gradient; a NaN weight
// touching the map gives NaN location gradients and NaN value gradients at in-map corners.
template <typename scalar_t, typename acc_t, typename AddFn>
MRDETR_HD void point_backward(const scalar_t* v, acc_t* grad_v, int64_t pixel_stride,
                              const Bilinear<acc_t>& b, acc_t attn, const scalar_t* g,
                              int64_t channels, int64_t height, int64_t width, AddFn add,
                              acc_t* grad_loc_x, acc_t* grad_loc_y, acc_t* grad_attn) {
  if (pixelless_point_gradients(b, grad_loc_x, grad_loc_y, grad_attn)) return;
  acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int c = 0; c < 4; ++c) {
    if (b.offset[c] < 0) continue;
    const scalar_t* vc = v + b.offset[c] * pixel_stride;
    acc_t* gc = grad_v + b.offset[c] * pixel_stride;
    const acc_t w = attn * b.weight[c];
    acc_t s = acc_t(0);
    MRDETR_SIMD_SUM_S
    for (int64_t d = 0; d < channels; ++d) {
      const acc_t gd = static_cast<acc_t>(g[d]);
      s += gd * static_cast<acc_t>(vc[d]);
      add(gc + d, w * gd);
    }
    dot[c] = s;
  }
  point_gradients(b, attn, dot, height, width, grad_loc_x, grad_loc_y, grad_attn);
}

}  // namespace mrdetr
