// Python binding of the CUDA op: fastgeffect._C_cuda.dot_accumulate_.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include "dot_cuda.h"
#include "dot_torch.h"

namespace fastgeffect {
namespace {

void dot_accumulate_cuda_(at::Tensor acc, const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                          const std::vector<int64_t>& groups) {
  TORCH_CHECK_VALUE(!acc.defined() || acc.is_cuda(), "dot_accumulate_: fastgeffect._C_cuda handles CUDA tensors, acc is on ",
                    acc.device());
  std::vector<at::Tensor> keep;
  keep.reserve(2 * a.size());  // no reallocation: pack_items keeps pointers into it
  const std::vector<DotItem> items = pack_items(acc, a, b, groups, keep);
  if (items.empty()) return;
  const c10::cuda::CUDAGuard guard(acc.device());
  const cudaError_t err = dot_accumulate_cuda(items.data(), static_cast<int64_t>(items.size()), acc.data_ptr(),
                                              acc.scalar_type() == at::kDouble, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dot_accumulate_: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace fastgeffect

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastgeffect CUDA ops (multi-tensor kernels)";
  m.def("dot_accumulate_", &fastgeffect::dot_accumulate_cuda_, pybind11::arg("acc"), pybind11::arg("tensors_a"),
        pybind11::arg("tensors_b"), pybind11::arg("group_ids"),
        "acc[group_ids[i]] += <tensors_a[i], tensors_b[i]>, few launches, no host sync",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("max_tensors_per_launch") = fastgeffect::kCudaMaxTensorsPerLaunch;
}
