// An uninitialised CPU buffer that Linux may back with transparent huge pages.
//
// The backward's value gradient is dense ([B, S, H, D], 40 MiB for a DETR decoder call) and
// freshly allocated on every call; large allocations come straight from mmap, so its first
// touch takes one page fault per 4 KiB page. On a VM that was about half of the decoder's
// backward time. Advising the kernel to use 2 MiB pages (MADV_HUGEPAGE, the same advice
// PyTorch's own allocator gives under THP_MEM_ALLOC_ENABLE=1) before the first touch replaces
// ~10k faults with ~20. Only whole 2 MiB pages inside the buffer are advised; the advice is a
// hint that changes no data, and where it is unsupported (other systems, THP off) nothing
// changes. The caller writes every element (value_grad.h zeroes it chunk by chunk).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mrdetr {
namespace cpu {

inline at::Tensor empty_advising_huge_pages(at::IntArrayRef sizes, at::TensorOptions options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(2) << 20;
  const auto start = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t last = (start + t.nbytes()) & ~(kHuge - 1);
  if (last > first) {
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint only
  }
#endif
  return t;
}

// Scratch memory of `bytes` bytes whose start (`data`) is 2 MiB aligned, advised like above, so
// that every whole 2 MiB of it can be a huge page; `storage` owns it.
struct HugePageScratch {
  explicit HugePageScratch(int64_t bytes) {
    constexpr int64_t kHuge = int64_t(2) << 20;
    const int64_t slack = bytes >= kHuge ? kHuge : 0;  // small buffers: no alignment needed
    storage = empty_advising_huge_pages({bytes + slack}, at::TensorOptions().dtype(at::kByte));
    const auto start = reinterpret_cast<std::uintptr_t>(storage.data_ptr());
    const auto aligned = slack ? (start + kHuge - 1) & ~std::uintptr_t(kHuge - 1) : start;
    data = reinterpret_cast<void*>(aligned);
  }
  at::Tensor storage;
  void* data = nullptr;
};

}  // namespace cpu
}  // namespace mrdetr
