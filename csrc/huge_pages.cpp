// Transparent huge pages for fresh CPU outputs.
//
// A fresh 64 MB output costs 16384 page faults on first touch with 4 KB pages, which on the
// 2-core machines takes longer than the arithmetic itself. Asking the kernel for huge pages on
// the buffers fastflow allocates itself cuts that to 32 faults. PyTorch does the same for every
// allocation when THP_MEM_ALLOC_ENABLE=1; this applies it to our outputs only, by default.
#include "affine.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace fastflow {

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  TORCH_CHECK(t.device().is_cpu(), "advise_huge_pages: expected a CPU tensor");
  if (t.nbytes() < kHugePageMinBytes) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  // Only whole huge pages inside the tensor; the advice is a hint, so failures are ignored.
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

at::Tensor fresh_output(const at::Tensor& like, bool keep_layout) {
  at::Tensor out = keep_layout ? at::empty_strided(like.sizes(), like.strides(), like.options())
                               : at::empty(like.sizes(), like.options());
  advise_huge_pages(out);
  return out;
}

}  // namespace fastflow
