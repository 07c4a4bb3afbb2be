// Gather-then-accumulate for the CPU kernels: latency hiding for scattered value reads.
//
// Every sampling point reads four value rows (one per bilinear corner, D channels each) at
// unpredictable addresses. Read one after another as the arithmetic needs them, each row waits
// for memory (~100 ns, more on a busy VM) and the kernel runs at memory latency: the CPU's
// reorder window holds only a few points' worth of instructions. So the kernels work in two
// phases per "task" (one (query, head) pair):
//   1. gather: compute the bilinear corners of all L*P points with the shared header's
//      `bilinear()` (same bounds and non-finite rules as the CUDA kernel);
//   2. accumulate: run the channel loops over those corners.
// Task t + 1 is gathered before task t is accumulated, and while task t's corners are
// accumulated one by one, the rows of task t + 1's corners are prefetched, one per step: the
// next task's reads travel while the current one computes, spread out so that the prefetches
// never wait for free miss buffers in a burst. The prefetches fill the L2, not the L1
// (locality 2: prefetcht1 on x86): a core tracks far fewer outstanding L1 misses than L2 misses,
// and L1 prefetches capped the reads in flight (decoder forward, 1 thread, Zen 4 VM, same run:
// uniform sampling 2.5 ms with L1 prefetches, 1.85 ms with L2 ones, cache-hot 1.32 ms with
// either); the L2 hits that remain are short enough for the reorder window. Prefetches are
// hints: they never fault and never change a result, and they are issued only for in-bounds
// rows (every read stays inside `value`).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "ms_deform_attn.h"

// GCC treats __builtin_prefetch as free of side effects, so a function whose body only
// prefetches (prefetch_point below) is judged pure and every call to it is deleted: GCC 12 left
// the backward without a single prefetch instruction. The empty volatile asm that names the
// address is a side effect the optimiser must keep, and costs no instruction.
#if defined(__GNUC__) || defined(__clang__)
#define MRDETR_PREFETCH(ptr, write)                     \
  do {                                                  \
    const void* mrdetr_prefetched_ = (ptr);             \
    __builtin_prefetch(mrdetr_prefetched_, (write), 2); \
    __asm__ volatile("" : : "r"(mrdetr_prefetched_));   \
  } while (0)
#else
#define MRDETR_PREFETCH(ptr, write) ((void)(ptr))
#endif

namespace mrdetr {
namespace cpu {

constexpr std::uintptr_t kLine = 64;  // cache-line size in bytes (x86-64, most Arm cores)
constexpr int64_t kBlock = 16;        // channels accumulated in registers at a time

// Prefetch every cache line of the n-element row at p (p need not be line-aligned).
template <bool write, typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const auto first = reinterpret_cast<std::uintptr_t>(p) & ~(kLine - 1);
  const auto last = reinterpret_cast<std::uintptr_t>(p + n) - 1;
  for (std::uintptr_t a = first; a <= last; a += kLine) {
    MRDETR_PREFETCH(reinterpret_cast<const void*>(a), write ? 1 : 0);
  }
}

// Level geometry as the kernels read it: height, width and first pixel of every level.
struct LevelView {
  const int64_t* height;
  const int64_t* width;
  const int64_t* start;
};

// One in-bounds corner of a forward task: its value row and attn * bilinear weight.
template <typename scalar_t, typename acc_t>
struct Corner {
  const scalar_t* row;
  acc_t weight;
};

// Forward phase 1 for one (query, head): the in-bounds corners of its L*P points, in point then
// corner order; returns how many were written to `out` (at most 4*L*P).
// loc / attn are indexed from flat point i0 = [b, q, h, 0, 0]; v points at value[b, 0, h, 0],
// whose pixel rows lie pixel_stride elements apart and hold `channels` elements.
template <typename scalar_t, typename acc_t>
inline int64_t gather_corners(const scalar_t* loc, const scalar_t* attn, int64_t i0,
                              const LevelView& lv, int64_t levels, int64_t points,
                              const scalar_t* v, int64_t pixel_stride, int64_t channels,
                              Corner<scalar_t, acc_t>* out) {
  int64_t n = 0;
  for (int64_t l = 0; l < levels; ++l) {
    const scalar_t* vl = v + lv.start[l] * pixel_stride;
    for (int64_t p = 0; p < points; ++p) {
      const int64_t i = i0 + l * points + p;
      const auto bil = bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]),
                                       static_cast<acc_t>(loc[2 * i + 1]), lv.height[l],
                                       lv.width[l]);
      const acc_t a = static_cast<acc_t>(attn[i]);
      if (nan_point(bil, a)) {  // the shared non-finite rule: this (query, head) row is NaN
        out[n++] = {vl, quiet_nan<acc_t>()};  // pixel 0 of the level: always inside value
        continue;
      }
      for (int c = 0; c < 4; ++c) {
        if (bil.offset[c] < 0) continue;
        out[n++] = {vl + bil.offset[c] * pixel_stride, a * bil.weight[c]};
      }
    }
  }
  return n;
}

// Forward phase 2: o[d0 : d0 + width] = sum_k corners[k].weight * corners[k].row[d0 : ...],
// summed in corner order (the order of the one-point-at-a-time loop), with width <= kBlock
// accumulators in registers; `full` (width == kBlock) lets the compiler unroll the channel loop.
// Step k also prefetches the row of next[k] (next[0 : n_next], the next task's corners).
template <bool full, typename scalar_t, typename acc_t>
inline void accumulate_block(const Corner<scalar_t, acc_t>* corners, int64_t n, int64_t d0,
                             int64_t width, scalar_t* o, const Corner<scalar_t, acc_t>* next,
                             int64_t n_next, int64_t channels) {
  const int64_t w = full ? kBlock : width;
  acc_t acc[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) acc[j] = acc_t(0);
  for (int64_t k = 0; k < n; ++k) {
    if (k < n_next) prefetch_row<false>(next[k].row, channels);
    const scalar_t* row = corners[k].row + d0;
    const acc_t weight = corners[k].weight;
    MRDETR_SIMD
    for (int64_t j = 0; j < w; ++j) acc[j] += weight * static_cast<acc_t>(row[j]);
  }
  for (int64_t k = n; k < n_next; ++k) prefetch_row<false>(next[k].row, channels);
  for (int64_t j = 0; j < w; ++j) o[d0 + j] = static_cast<scalar_t>(acc[j]);
}

// Forward phase 2 over all channels of a task (full blocks of kBlock, then the remainder),
// prefetching the next task's corner rows during the first block.
template <typename scalar_t, typename acc_t>
inline void accumulate(const Corner<scalar_t, acc_t>* corners, int64_t n,
                       const Corner<scalar_t, acc_t>* next, int64_t n_next, int64_t channels,
                       scalar_t* o) {
  int64_t d0 = 0;
  for (; d0 + kBlock <= channels; d0 += kBlock) {
    accumulate_block<true>(corners, n, d0, kBlock, o, next, d0 == 0 ? n_next : 0, channels);
  }
  if (d0 < channels) {
    accumulate_block<false>(corners, n, d0, channels - d0, o, next, d0 == 0 ? n_next : 0,
                            channels);
  }
}

// <a, b> over n elements in acc_t: kLanes partial sums (one vector register for fp32 on AVX2)
// reduced in a fixed order, so the result never depends on the run.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  constexpr int64_t kLanes = 8;
  acc_t part[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) part[j] = acc_t(0);
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    MRDETR_SIMD
    for (int64_t j = 0; j < kLanes; ++j) {
      part[j] += static_cast<acc_t>(a[d + j]) * static_cast<acc_t>(b[d + j]);
    }
  }
  for (int64_t j = 0; d + j < n; ++j) {
    part[j] += static_cast<acc_t>(a[d + j]) * static_cast<acc_t>(b[d + j]);
  }
  acc_t s = acc_t(0);
  for (int64_t j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

// One sampling point of a backward task: its corners, attention weight and level.
template <typename acc_t>
struct Point {
  Bilinear<acc_t> bil;
  acc_t attn;
  int64_t level;
};

// Backward phase 1 for one (query, head): points[0 : L*P] (all points, in bounds or not, since
// each gets a location and weight gradient).
template <typename scalar_t, typename acc_t>
inline void gather_points(const scalar_t* loc, const scalar_t* attn, int64_t i0,
                          const LevelView& lv, int64_t levels, int64_t points,
                          Point<acc_t>* out) {
  for (int64_t l = 0; l < levels; ++l) {
    for (int64_t p = 0; p < points; ++p) {
      const int64_t i = i0 + l * points + p;
      Point<acc_t>& pt = out[l * points + p];
      pt.bil = bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]),
                               lv.height[l], lv.width[l]);
      pt.attn = static_cast<acc_t>(attn[i]);
      pt.level = l;
    }
  }
}

// Prefetch the in-bounds corner rows of value of one backward point (v at [b, 0, h, 0]).
template <typename scalar_t, typename acc_t>
inline void prefetch_point(const Point<acc_t>& pt, const LevelView& lv, const scalar_t* v,
                           int64_t pixel_stride, int64_t channels) {
  for (int c = 0; c < 4; ++c) {
    if (pt.bil.offset[c] < 0) continue;
    prefetch_row<false>(v + (lv.start[pt.level] + pt.bil.offset[c]) * pixel_stride, channels);
  }
}

// Two buffers for a run of tasks: `current` is accumulated while `next` is gathered.
template <typename T>
struct Pipeline {
  explicit Pipeline(int64_t capacity)
      : current(static_cast<size_t>(capacity)), next(static_cast<size_t>(capacity)) {}
  void advance() {
    std::swap(current, next);
    std::swap(current_size, next_size);
  }
  std::vector<T> current, next;
  int64_t current_size = 0, next_size = 0;
};

}  // namespace cpu
}  // namespace mrdetr
