// CUDA launcher of the grouped dot accumulation (plain CUDA runtime, no libtorch).
#pragma once

#include <cuda_runtime_api.h>

#include "dot_core.h"

namespace fastgeffect {

// acc[items[i].group] += <items[i].a, items[i].b> for every item, all pointers on the current
// device. `acc` is float* (acc_is_double false) or double*; blocks accumulate in acc's type
// (at least fp32) and add their partial with one atomic each. Launches on `stream` in as few
// kernels as the kernel-argument space allows (kCudaMaxTensorsPerLaunch items per launch,
// any number of blocks each); never synchronises. Returns the first launch error, if any.
cudaError_t dot_accumulate_cuda(const DotItem* items, int64_t n_items, void* acc,
                                bool acc_is_double, cudaStream_t stream);

constexpr int kCudaMaxTensorsPerLaunch = 96;

}  // namespace fastgeffect
