// Multi-tensor grouped dot product on the GPU, in the style of apex's multi_tensor_apply:
// the host packs pointers, sizes, dtypes and groups of up to kCudaMaxTensorsPerLaunch pairs
// into the kernel's argument block (no device metadata buffer, so no copy and no sync); each
// CUDA block reduces one kBlockElems slice of one pair and adds it to acc[group] atomically.
#include <climits>
#include <cstdint>

#include "dot_cuda.h"

namespace fastgeffect {
namespace {

constexpr int kThreads = 256;
// Elements per block: 128 Ki, i.e. 64 loop trips of 256 threads x 8 elements. Large enough
// that the per-block atomic is negligible, small enough for many waves on any GPU.
constexpr int64_t kBlockElems = int64_t{1} << 17;
constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread and side

struct LaunchMeta {
  const void* a[kCudaMaxTensorsPerLaunch];
  const void* b[kCudaMaxTensorsPerLaunch];
  int64_t n[kCudaMaxTensorsPerLaunch];
  int32_t first_block[kCudaMaxTensorsPerLaunch];  // prefix sum of blocks per pair
  int32_t group[kCudaMaxTensorsPerLaunch];
  uint8_t dtype_a[kCudaMaxTensorsPerLaunch];
  uint8_t dtype_b[kCudaMaxTensorsPerLaunch];
  int32_t n_tensors;
};
// Kernel parameters are limited to 4 KiB on every architecture and toolkit torch supports.
static_assert(sizeof(LaunchMeta) + sizeof(void*) <= 4096, "LaunchMeta exceeds the kernel argument limit");

template <typename T> __device__ __forceinline__ float to_acc(T x, float) { return to_float(x); }
template <typename T> __device__ __forceinline__ double to_acc(T x, double) { return to_double(x); }

// kVec elements per load so that the wider side reads 16 bytes per thread and load: keeps
// the register footprint equal across dtype pairs (the kernel's occupancy is set by its
// widest branch).
template <typename TA, typename TB>
struct VecWidth {
  static constexpr int value = 16 / (sizeof(TA) > sizeof(TB) ? sizeof(TA) : sizeof(TB));
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename acc_t, typename TA, typename TB>
__device__ acc_t slice_dot(const TA* __restrict__ a, const TB* __restrict__ b, int64_t begin,
                           int64_t end) {
  constexpr int kVec = VecWidth<TA, TB>::value;
  using VA = Vec<TA, kVec>;
  using VB = Vec<TB, kVec>;
  acc_t s = 0;
  int64_t tail = begin;
  // Vector loads need both slice starts aligned to the vector size; a view with an odd
  // storage offset takes the scalar loop below instead.
  const bool aligned = reinterpret_cast<uintptr_t>(a + begin) % alignof(VA) == 0 &&
                       reinterpret_cast<uintptr_t>(b + begin) % alignof(VB) == 0;
  if (aligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    const int64_t stride = int64_t{kThreads} * kVec;
    int64_t j = begin + int64_t{threadIdx.x} * kVec;
    for (; j + (kUnroll - 1) * stride < vec_end; j += kUnroll * stride) {
      VA va[kUnroll];
      VB vb[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        va[u] = *reinterpret_cast<const VA*>(a + j + u * stride);
        vb[u] = *reinterpret_cast<const VB*>(b + j + u * stride);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int k = 0; k < kVec; ++k) s += to_acc(va[u].v[k], acc_t{}) * to_acc(vb[u].v[k], acc_t{});
    }
    for (; j < vec_end; j += stride) {
      const VA va = *reinterpret_cast<const VA*>(a + j);
      const VB vb = *reinterpret_cast<const VB*>(b + j);
#pragma unroll
      for (int k = 0; k < kVec; ++k) s += to_acc(va.v[k], acc_t{}) * to_acc(vb.v[k], acc_t{});
    }
    tail = vec_end;
  }
  for (int64_t j = tail + threadIdx.x; j < end; j += kThreads) s += to_acc(a[j], acc_t{}) * to_acc(b[j], acc_t{});
  return s;
}

template <typename acc_t, typename TA>
__device__ acc_t dispatch_b(const TA* a, uint8_t db, const void* b, int64_t begin, int64_t end) {
  switch (db) {
    case kF32: return slice_dot<acc_t>(a, static_cast<const float*>(b), begin, end);
    case kF16: return slice_dot<acc_t>(a, static_cast<const f16_raw*>(b), begin, end);
    case kBF16: return slice_dot<acc_t>(a, static_cast<const bf16_raw*>(b), begin, end);
    default: return slice_dot<acc_t>(a, static_cast<const double*>(b), begin, end);
  }
}

template <typename acc_t>
__device__ acc_t dispatch(uint8_t da, uint8_t db, const void* a, const void* b, int64_t begin,
                          int64_t end) {
  switch (da) {
    case kF32: return dispatch_b<acc_t>(static_cast<const float*>(a), db, b, begin, end);
    case kF16: return dispatch_b<acc_t>(static_cast<const f16_raw*>(a), db, b, begin, end);
    case kBF16: return dispatch_b<acc_t>(static_cast<const bf16_raw*>(a), db, b, begin, end);
    default: return dispatch_b<acc_t>(static_cast<const double*>(a), db, b, begin, end);
  }
}

// Sum over the block; the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : acc_t{0};
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

__device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }

__device__ __forceinline__ void atomic_add(double* p, double v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 600
  atomicAdd(p, v);
#else  // pre-Pascal: compare-and-swap loop
  auto* addr = reinterpret_cast<unsigned long long*>(p);
  unsigned long long old = *addr, assumed;
  do {
    assumed = old;
    old = atomicCAS(addr, assumed, __double_as_longlong(v + __longlong_as_double(assumed)));
  } while (assumed != old);
#endif
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) dot_accumulate_kernel(const LaunchMeta meta, acc_t* acc) {
  // Find this block's pair: the last one whose first block is <= blockIdx.x (empty pairs are
  // never packed, so the prefix is strictly increasing).
  const int32_t blk = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = meta.n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta.first_block[mid] <= blk) lo = mid; else hi = mid - 1;
  }
  const int64_t begin = int64_t{blk - meta.first_block[lo]} * kBlockElems;
  const int64_t end = begin + kBlockElems < meta.n[lo] ? begin + kBlockElems : meta.n[lo];
  const acc_t s = block_sum(dispatch<acc_t>(meta.dtype_a[lo], meta.dtype_b[lo], meta.a[lo], meta.b[lo], begin, end));
  if (threadIdx.x == 0) atomic_add(acc + meta.group[lo], s);
}

}  // namespace

cudaError_t dot_accumulate_cuda(const DotItem* items, int64_t n_items, void* acc,
                                bool acc_is_double, cudaStream_t stream) {
  LaunchMeta meta;
  meta.n_tensors = 0;
  int64_t blocks = 0;
  cudaError_t err = cudaSuccess;
  auto flush = [&]() {
    if (meta.n_tensors == 0 || err != cudaSuccess) return;
    if (acc_is_double)
      dot_accumulate_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, static_cast<double*>(acc));
    else
      dot_accumulate_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, static_cast<float*>(acc));
    err = cudaGetLastError();
    meta.n_tensors = 0;
    blocks = 0;
  };
  for (int64_t i = 0; i < n_items && err == cudaSuccess; ++i) {
    const DotItem& it = items[i];
    if (it.n == 0) continue;
    const int64_t nb = (it.n + kBlockElems - 1) / kBlockElems;
    if (meta.n_tensors == kCudaMaxTensorsPerLaunch || blocks + nb > INT32_MAX) flush();
    if (nb > INT32_MAX) return cudaErrorInvalidValue;  // > 2^48 elements: not a real tensor
    const int k = meta.n_tensors++;
    meta.a[k] = it.a;
    meta.b[k] = it.b;
    meta.n[k] = it.n;
    meta.first_block[k] = static_cast<int32_t>(blocks);
    meta.group[k] = static_cast<int32_t>(it.group);
    meta.dtype_a[k] = it.dtype_a;
    meta.dtype_b[k] = it.dtype_b;
    blocks += nb;
  }
  flush();
  return err;
}

}  // namespace fastgeffect
