// Python binding of the CPU op: fastgeffect._C.dot_accumulate_.
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include "dot_core.h"
#include "dot_torch.h"

namespace fastgeffect {
namespace {

void dot_accumulate_cpu_(at::Tensor acc, const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                         const std::vector<int64_t>& groups) {
  TORCH_CHECK_VALUE(!acc.defined() || acc.device().is_cpu(), "dot_accumulate_: fastgeffect._C handles CPU tensors, acc is on ",
                    acc.device());
  std::vector<at::Tensor> keep;
  keep.reserve(2 * a.size());  // no reallocation: pack_items keeps pointers into it
  const std::vector<DotItem> items = pack_items(acc, a, b, groups, keep);
  const std::vector<DotChunk> chunks = plan_chunks(items.data(), static_cast<int64_t>(items.size()), kHostChunkElems);
  std::vector<double> partials(chunks.size());
  // Each chunk writes its own slot, then one serial pass sums them in order: the result is
  // the same for any thread count.
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      partials[c] = dot_range(items[chunks[c].item], chunks[c].begin, chunks[c].end);
  });
  std::vector<double> sums(acc.numel(), 0.0);
  reduce_partials(items.data(), chunks.data(), partials.data(), static_cast<int64_t>(chunks.size()), sums.data());
  std::vector<char> touched(acc.numel(), 0);
  for (const DotItem& it : items) touched[it.group] = 1;
  if (acc.scalar_type() == at::kDouble) {
    double* out = acc.data_ptr<double>();
    for (int64_t g = 0; g < acc.numel(); ++g) if (touched[g]) out[g] += sums[g];
  } else {
    float* out = acc.data_ptr<float>();
    for (int64_t g = 0; g < acc.numel(); ++g) if (touched[g]) out[g] = static_cast<float>(out[g] + sums[g]);
  }
}

}  // namespace
}  // namespace fastgeffect

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastgeffect CPU ops (C++, at::parallel_for)";
  m.def("dot_accumulate_", &fastgeffect::dot_accumulate_cpu_, pybind11::arg("acc"), pybind11::arg("tensors_a"),
        pybind11::arg("tensors_b"), pybind11::arg("group_ids"),
        "acc[group_ids[i]] += <tensors_a[i], tensors_b[i]>, fp64 accumulation, one parallel pass",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("host_chunk_elems") = fastgeffect::kHostChunkElems;
}
