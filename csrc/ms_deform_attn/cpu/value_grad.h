// The CPU backward's value gradient, filled one cache-sized chunk of pixels at a time.
//
// The value gradient [B, S, H, D] is dense (40 MiB for a DETR decoder call) but the sampling
// points update it at scattered rows. Zeroing it up front and then adding into it point by point
// makes every update a cache miss on a row the zero-fill already pushed out of the cache (a read
// and a later write-back per row), and leaves the zero-fill itself, with its page faults,
// outside the parallel work. So the backward runs in two phases:
//   1. points, parallel over contiguous ranges ("parts") of (batch, query, head) tasks: read the
//      corner rows of value, write the location and weight gradients, and record each in-map
//      corner's update `grad_value[b, pixel, h, :] += weight * grad_output[b, q, h, :]` in the
//      list of (part, chunk of pixels the row lies in);
//   2. chunks, parallel over chunks of about kChunkBytes of the value gradient: zero the chunk
//      and apply its updates, part after part. The chunk stays in cache while it is filled, and
//      its memory is first touched (page faults included) by the thread that fills it.
// Tasks run in waves of at most kWaveUpdates recorded updates (16 B each in fp32; a DETR decoder
// call needs one wave of about 5 MiB), each wave's phase 2 adding to the chunks the first wave
// zeroed. Every row receives its updates in (query, point, corner) order whatever the number of
// parts, waves or threads, so the value gradient is bitwise identical across runs and thread
// counts (for one build of the kernel).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/huge_pages.h"
#include "ms_deform_attn.h"

namespace mrdetr {
namespace cpu {

constexpr int64_t kChunkBytes = int64_t(256) << 10;  // well inside a 512 KiB - 2 MiB L2
constexpr int64_t kBlockUpdates = 256;               // updates per block of an update list
constexpr int64_t kWaveUpdates = int64_t(1) << 21;   // phase-1 updates held at once (32 MiB fp32)

// One recorded update: grad_value[chunk row dst, :] += weight * grad_output[row src, :].
template <typename acc_t>
struct Update {
  int64_t src;  // row (b, q, h) of grad_output seen as [B*Q*H, D]
  int32_t dst;  // (pixel - first pixel of the chunk) * H + h
  acc_t weight;
};

// Chunks of `pixels` (a power of two) consecutive pixels of one image: chunk c covers image
// c / per_image, pixels [(c % per_image) * pixels, min(S, ... + pixels)), all heads.
struct ChunkGrid {
  ChunkGrid(int64_t images, int64_t S, int64_t heads, int64_t row_bytes) : S(S), heads(heads) {
    const int64_t budget = kChunkBytes / std::max<int64_t>(1, heads * row_bytes);
    while (shift < 62 && (int64_t(2) << shift) <= budget) ++shift;
    pixels = int64_t(1) << shift;
    per_image = (S + pixels - 1) / pixels;
    count = images * per_image;
    // a chunk's rows are indexed with int32 (Update::dst): heads * pixels rows at most
    TORCH_CHECK_VALUE(heads <= std::numeric_limits<int32_t>::max() / pixels,
                      "ms_deform_attn: value has too many heads (", heads,
                      ") for the CPU backward; at most 2^31 - 1 are supported");
  }
  int64_t first_pixel(int64_t chunk) const { return (chunk % per_image) * pixels; }
  int64_t end_pixel(int64_t chunk) const { return std::min(S, first_pixel(chunk) + pixels); }
  int64_t S, heads, shift = 0, pixels = 1, per_image = 0, count = 0;
};

// Update lists of every (part, chunk), filled by phase 1 (each part by one thread). A list is a
// chain of blocks of kBlockUpdates updates taken from its part's share of one buffer, allocated
// once per wave for at most `capacity` updates per part (no reallocation, no copy).
template <typename acc_t>
class UpdateLists {
 public:
  UpdateLists(int64_t parts, int64_t capacity, const ChunkGrid& grid)
      : grid_(grid),
        parts_(parts),
        part_blocks_((capacity + kBlockUpdates - 1) / kBlockUpdates + grid.count),
        buffer_(parts * part_blocks_ * kBlockUpdates * int64_t(sizeof(Update<acc_t>))),
        used_(static_cast<size_t>(parts), 0),
        lists_(static_cast<size_t>(parts * grid.count)) {}

  // Record grad_value[b, pixel, h, :] += weight * grad_output row src (0 <= pixel < S). At most
  // `capacity` calls per part.
  void add(int64_t part, int64_t b, int64_t pixel, int64_t h, int64_t src, acc_t weight) {
    const int64_t chunk = b * grid_.per_image + (pixel >> grid_.shift);
    List& list = lists_[static_cast<size_t>(part * grid_.count + chunk)];
    if (list.tail == list.end) {
      int64_t& used = used_[static_cast<size_t>(part)];
      TORCH_CHECK(used < part_blocks_, "ms_deform_attn: CPU backward update buffer overflow");
      list.tail = base() + (part * part_blocks_ + used++) * kBlockUpdates;
      list.end = list.tail + kBlockUpdates;
      list.blocks.push_back(list.tail);
    }
    const int64_t within = pixel & (grid_.pixels - 1);
    *list.tail++ = {src, static_cast<int32_t>(within * grid_.heads + h), weight};
  }

  // Number of updates recorded for `chunk`, over all parts.
  int64_t count(int64_t chunk) const {
    int64_t n = 0;
    for (int64_t part = 0; part < parts_; ++part) {
      const List& list = lists_[static_cast<size_t>(part * grid_.count + chunk)];
      if (list.blocks.empty()) continue;
      n += static_cast<int64_t>(list.blocks.size() - 1) * kBlockUpdates +
           (list.tail - list.blocks.back());
    }
    return n;
  }

  // Call f(update) for every update of `chunk`, parts in order, each in recording order.
  template <typename F>
  void for_each(int64_t chunk, F&& f) const {
    for (int64_t part = 0; part < parts_; ++part) {
      const List& list = lists_[static_cast<size_t>(part * grid_.count + chunk)];
      for (const Update<acc_t>* block : list.blocks) {
        const Update<acc_t>* end = block == list.blocks.back() ? list.tail : block + kBlockUpdates;
        for (const Update<acc_t>* u = block; u != end; ++u) f(*u);
      }
    }
  }

 private:
  struct List {
    std::vector<Update<acc_t>*> blocks;
    Update<acc_t>* tail = nullptr;
    Update<acc_t>* end = nullptr;
  };
  Update<acc_t>* base() { return static_cast<Update<acc_t>*>(buffer_.data); }

  ChunkGrid grid_;
  int64_t parts_, part_blocks_;
  HugePageScratch buffer_;
  std::vector<int64_t> used_;
  std::vector<List> lists_;
};

// Phase 2: apply the updates of one wave to gv ([B, S, H, D] in acc_t), reading grad_output g
// ([B*Q*H, D]); the first wave zeroes every chunk first. Each thread takes one contiguous range of
// chunks, so threads first-touch (and the kernel clears) disjoint pages side by side; the ranges
// split the estimated cost evenly (cache lines zeroed plus updates applied: the chunks of the
// small levels hold most updates). A chunk is filled whole by one thread, so the order of
// additions never depends on the number of threads.
template <typename scalar_t, typename acc_t>
void fill_value_grad(const UpdateLists<acc_t>& lists, const ChunkGrid& grid, bool first_wave,
                     const scalar_t* g, int64_t channels, acc_t* gv) {
  const int64_t stride = grid.heads * channels;  // elements per pixel
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), grid.count));
  std::vector<int64_t> cost(static_cast<size_t>(grid.count + 1), 0);
  const int64_t lines_per_pixel =
      first_wave ? std::max<int64_t>(1, stride * int64_t(sizeof(acc_t)) / 64) : 0;
  for (int64_t chunk = 0; chunk < grid.count; ++chunk) {
    const int64_t pixels = grid.end_pixel(chunk) - grid.first_pixel(chunk);
    cost[static_cast<size_t>(chunk + 1)] =
        cost[static_cast<size_t>(chunk)] + pixels * lines_per_pixel + lists.count(chunk);
  }
  std::vector<int64_t> bounds(static_cast<size_t>(threads + 1), grid.count);  // thread t: chunks
                                                                           // [bounds[t], bounds[t+1])
  bounds[0] = 0;
  for (int64_t t = 1, chunk = 0; t < threads; ++t) {
    const int64_t target = cost.back() * t / threads;
    while (chunk < grid.count && cost[static_cast<size_t>(chunk)] < target) ++chunk;
    bounds[static_cast<size_t>(t)] = chunk;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c1 = bounds[static_cast<size_t>(t + 1)];
      for (int64_t chunk = bounds[static_cast<size_t>(t)]; chunk < c1; ++chunk) {
        const int64_t image = chunk / grid.per_image, s0 = grid.first_pixel(chunk);
        acc_t* base = gv + (image * grid.S + s0) * stride;
        if (first_wave) std::fill(base, base + (grid.end_pixel(chunk) - s0) * stride, acc_t(0));
        lists.for_each(chunk, [&](const Update<acc_t>& u) {
          acc_t* dst = base + static_cast<int64_t>(u.dst) * channels;
          const scalar_t* src = g + u.src * channels;
          const acc_t w = u.weight;
          MRDETR_SIMD
          for (int64_t d = 0; d < channels; ++d) dst[d] += w * static_cast<acc_t>(src[d]);
        });
      }
    }
  });
}

}  // namespace cpu
}  // namespace mrdetr
