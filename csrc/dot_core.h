// Core of the grouped gradient dot accumulation: acc[group_i] += <a_i, b_i>.
//
// Plain C++ (no libtorch), so the standalone CMake build and its ctest are fast; the torch
// bindings (bindings.cpp, bindings_cuda.cpp) and the CUDA kernel (dot_cuda.cu) share it.
// Inputs are raw pointers plus a dtype tag per side, so a pair may mix dtypes and nothing is
// cast into a temporary copy: each element is converted to float/double on the fly.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define FGE_HD __host__ __device__ __forceinline__
#else
#define FGE_HD inline
#endif

namespace fastgeffect {

// Element types the op reads. Values are part of the binding ABI: keep them stable.
enum DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// One (a, b, group) pair: n contiguous elements each.
struct DotItem {
  const void* a;
  const void* b;
  int64_t n;
  int64_t group;
  DType dtype_a;
  DType dtype_b;
};

// A contiguous slice [begin, end) of item `item`: the unit of parallel work on the host.
struct DotChunk {
  int64_t item;
  int64_t begin;
  int64_t end;
};

// 16-bit storage types, converted by hand (bit manipulation) so the core needs no half library.
struct f16_raw { uint16_t x; };
struct bf16_raw { uint16_t x; };

FGE_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FGE_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// bf16 is the upper half of an fp32: exact.
FGE_HD float to_float(bf16_raw h) { return bits_to_f32(static_cast<uint32_t>(h.x) << 16); }

// IEEE fp16 -> fp32, exact for normals, subnormals, inf and nan. Branch-free, so the host loop
// auto-vectorises; after M. Dukhan's FP16 library (fp16_ieee_to_fp32_value).
FGE_HD float to_float(f16_raw h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.x));  // one hardware conversion on the GPU
#else
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal (and inf/nan): move exponent/mantissa into fp32 position, rebias by 2^-112.
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormal: build 0.5 + m * 2^-24 style value and subtract the magic bias.
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  // Select with a mask, not ?:, so the compiler if-converts and vectorises the loop.
  const uint32_t is_sub = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  const uint32_t bits = (f32_to_bits(denormalized) & is_sub) | (f32_to_bits(normalized) & ~is_sub);
  return bits_to_f32(sign | bits);
#endif
}

FGE_HD float to_float(float x) { return x; }
FGE_HD float to_float(double x) { return static_cast<float>(x); }
FGE_HD double to_double(double x) { return x; }
FGE_HD double to_double(float x) { return x; }
FGE_HD double to_double(f16_raw x) { return to_float(x); }
FGE_HD double to_double(bf16_raw x) { return to_float(x); }

// Sum of a[i] * b[i] over [begin, end) in fp64 (exact products for fp32/fp16/bf16 inputs).
// Eight independent partial sums let the compiler vectorise without -ffast-math.
template <typename TA, typename TB>
double dot_range_typed(const TA* a, const TB* b, int64_t begin, int64_t end) {
  constexpr int kLanes = 8;
  double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += to_double(a[i + l]) * to_double(b[i + l]);
  }
  double s = 0;
  for (; i < end; ++i) s += to_double(a[i]) * to_double(b[i]);
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// Runtime dtype dispatch for one slice of one item.
double dot_range(const DotItem& item, int64_t begin, int64_t end);

// Cut every item into slices of at most `chunk_elems` elements (empty items give none).
std::vector<DotChunk> plan_chunks(const DotItem* items, int64_t n_items, int64_t chunk_elems);

// group_sums[items[c.item].group] += partials[c] in chunk order (deterministic).
void reduce_partials(const DotItem* items, const DotChunk* chunks, const double* partials,
                     int64_t n_chunks, double* group_sums);

// Serial driver: group_sums[g] += sum of the dots of the items of group g.
void dot_accumulate_serial(const DotItem* items, int64_t n_items, double* group_sums,
                           int64_t chunk_elems);

// Host chunk size: 32 Ki elements (128 KiB of fp32 per side) keeps the parallel pieces
// large against scheduling cost yet small enough to balance two to a hundred threads.
constexpr int64_t kHostChunkElems = int64_t{1} << 15;

}  // namespace fastgeffect
