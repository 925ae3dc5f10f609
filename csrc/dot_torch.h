// Argument checking and packing shared by the CPU and CUDA torch bindings.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "dot_core.h"

namespace fastgeffect {

// "torch.int64" rather than c10's "Long": the name Python users know.
inline std::string dtype_name(at::ScalarType t) { return std::string("torch.") + std::string(c10::getDtypeNames(t).first); }

inline DType dtype_tag(const at::Tensor& t, size_t pair, const char* side) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default:
      TORCH_CHECK_TYPE(false, "dot_accumulate_: pair ", pair, ": tensor ", side, " has dtype ",
                       dtype_name(t.scalar_type()), "; supported: float32, float16, bfloat16, float64");
  }
  return kF32;  // unreachable
}

inline void check_acc(const at::Tensor& acc) {
  TORCH_CHECK_VALUE(acc.defined() && acc.dim() == 1, "dot_accumulate_: acc must be a 1-D tensor, got ",
                    acc.defined() ? acc.dim() : -1, " dimensions");
  TORCH_CHECK_TYPE(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
                   "dot_accumulate_: acc must be float32 or float64, got ", dtype_name(acc.scalar_type()));
  TORCH_CHECK_VALUE(acc.is_contiguous(), "dot_accumulate_: acc must be contiguous");
}

// Validates every pair against acc and returns the raw items. Non-contiguous inputs are
// replaced by contiguous copies, held in `keep` until the caller is done with the items
// (on CUDA the caching allocator's stream order keeps them valid for the queued kernels).
inline std::vector<DotItem> pack_items(const at::Tensor& acc, const std::vector<at::Tensor>& a,
                                       const std::vector<at::Tensor>& b,
                                       const std::vector<int64_t>& groups,
                                       std::vector<at::Tensor>& keep) {
  TORCH_CHECK_VALUE(a.size() == b.size() && a.size() == groups.size(),
                    "dot_accumulate_: tensors_a, tensors_b and group_ids must have the same length, got ",
                    a.size(), ", ", b.size(), ", ", groups.size());
  check_acc(acc);
  const int64_t n_groups = acc.numel();
  std::vector<DotItem> items;
  items.reserve(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor* ta = &a[i];
    const at::Tensor* tb = &b[i];
    TORCH_CHECK_VALUE(ta->defined() && tb->defined(), "dot_accumulate_: pair ", i, ": undefined tensor (None)");
    TORCH_CHECK_VALUE(ta->sizes() == tb->sizes(), "dot_accumulate_: pair ", i, ": shapes differ, ",
                      ta->sizes(), " vs ", tb->sizes());
    TORCH_CHECK_VALUE(ta->device() == acc.device() && tb->device() == acc.device(), "dot_accumulate_: pair ", i,
                      ": devices differ (", ta->device(), ", ", tb->device(), ", acc on ", acc.device(), ")");
    const DType da = dtype_tag(*ta, i, "a");
    const DType db = dtype_tag(*tb, i, "b");
    TORCH_CHECK_INDEX(groups[i] >= 0 && groups[i] < n_groups, "dot_accumulate_: pair ", i, ": group id ",
                      groups[i], " out of range for ", n_groups, " groups");
    if (!ta->is_contiguous()) { keep.push_back(ta->contiguous()); ta = &keep.back(); }
    if (!tb->is_contiguous()) { keep.push_back(tb->contiguous()); tb = &keep.back(); }
    items.push_back({ta->data_ptr(), tb->data_ptr(), ta->numel(), groups[i], da, db});
  }
  return items;
}

}  // namespace fastgeffect
