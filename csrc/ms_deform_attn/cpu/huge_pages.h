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

}  // namespace cpu
}  // namespace mrdetr
