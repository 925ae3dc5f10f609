#include "dot_core.h"

#include <stdexcept>

namespace fastgeffect {

namespace {

template <typename TA>
double dispatch_b(const TA* a, const DotItem& it, int64_t begin, int64_t end) {
  switch (it.dtype_b) {
    case kF32: return dot_range_typed(a, static_cast<const float*>(it.b), begin, end);
    case kF16: return dot_range_typed(a, static_cast<const f16_raw*>(it.b), begin, end);
    case kBF16: return dot_range_typed(a, static_cast<const bf16_raw*>(it.b), begin, end);
    case kF64: return dot_range_typed(a, static_cast<const double*>(it.b), begin, end);
  }
  throw std::invalid_argument("dot_accumulate: unknown dtype tag for b");
}

}  // namespace

// On x86-64 GCC/clang also emit an AVX2+FMA+F16C copy (flatten inlines the typed loops into
// each copy) picked at load time by the CPU's features; the loops are bandwidth-bound with
// 256-bit vectors, not with the baseline's 128-bit ones, mostly for fp16.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
__attribute__((target_clones("avx2", "default"), flatten))
#endif
double dot_range(const DotItem& it, int64_t begin, int64_t end) {
  switch (it.dtype_a) {
    case kF32: return dispatch_b(static_cast<const float*>(it.a), it, begin, end);
    case kF16: return dispatch_b(static_cast<const f16_raw*>(it.a), it, begin, end);
    case kBF16: return dispatch_b(static_cast<const bf16_raw*>(it.a), it, begin, end);
    case kF64: return dispatch_b(static_cast<const double*>(it.a), it, begin, end);
  }
  throw std::invalid_argument("dot_accumulate: unknown dtype tag for a");
}

std::vector<DotChunk> plan_chunks(const DotItem* items, int64_t n_items, int64_t chunk_elems) {
  if (chunk_elems <= 0) throw std::invalid_argument("dot_accumulate: chunk_elems must be positive");
  std::vector<DotChunk> chunks;
  for (int64_t i = 0; i < n_items; ++i) {
    for (int64_t begin = 0; begin < items[i].n; begin += chunk_elems) {
      const int64_t end = begin + chunk_elems < items[i].n ? begin + chunk_elems : items[i].n;
      chunks.push_back({i, begin, end});
    }
  }
  return chunks;
}

void reduce_partials(const DotItem* items, const DotChunk* chunks, const double* partials,
                     int64_t n_chunks, double* group_sums) {
  for (int64_t c = 0; c < n_chunks; ++c) group_sums[items[chunks[c].item].group] += partials[c];
}

void dot_accumulate_serial(const DotItem* items, int64_t n_items, double* group_sums,
                           int64_t chunk_elems) {
  const std::vector<DotChunk> chunks = plan_chunks(items, n_items, chunk_elems);
  std::vector<double> partials(chunks.size());
  for (size_t c = 0; c < chunks.size(); ++c)
    partials[c] = dot_range(items[chunks[c].item], chunks[c].begin, chunks[c].end);
  reduce_partials(items, chunks.data(), partials.data(), static_cast<int64_t>(chunks.size()),
                  group_sums);
}

}  // namespace fastgeffect
