// ctest for the CUDA kernel against the serial host core. Without a GPU it exits 77, which
// CMakeLists.txt registers as "skipped".
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "dot_core.h"
#include "dot_cuda.h"

using namespace fastgeffect;

#define CUDA_OK(x)                                                            \
  do {                                                                        \
    cudaError_t e_ = (x);                                                     \
    if (e_ != cudaSuccess) {                                                  \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      return 1;                                                               \
    }                                                                         \
  } while (0)

static size_t elem_size(DType t) { return t == kF64 ? 8 : t == kF32 ? 4 : 2; }

// Random bits for a dtype that decode to finite values in [-2, 2).
static std::vector<unsigned char> random_bytes(DType t, int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  std::vector<unsigned char> out(n * elem_size(t));
  for (int64_t i = 0; i < n; ++i) {
    const float f = u(rng);
    if (t == kF32) std::memcpy(&out[i * 4], &f, 4);
    if (t == kF64) { const double d = f; std::memcpy(&out[i * 8], &d, 8); }
    if (t == kBF16) { uint32_t b; std::memcpy(&b, &f, 4); const uint16_t h = b >> 16; std::memcpy(&out[i * 2], &h, 2); }
    if (t == kF16) {  // sign | exponent 14..15 | random mantissa: |v| in [2^-1, 2)
      const uint16_t h = static_cast<uint16_t>((f < 0 ? 0x8000 : 0) | ((14 + (rng() & 1)) << 10) | (rng() & 0x3FF));
      std::memcpy(&out[i * 2], &h, 2);
    }
  }
  return out;
}

int main() {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937 rng(7);
  const DType kinds[] = {kF32, kF16, kBF16, kF64};
  // Odd sizes around the 128 Ki-element block slice, plus empty and one-element pairs; 200
  // pairs so the launcher has to split the list over several launches.
  std::vector<int64_t> sizes = {0, 1, 3, (1 << 17) - 1, (1 << 17) + 5, 3 * (1 << 17) + 1001};
  while (sizes.size() < 200) sizes.push_back(rng() % 5000);
  int failures = 0;
  for (DType ta : kinds) {
    for (DType tb : kinds) {
      std::vector<std::vector<unsigned char>> ha, hb;
      std::vector<void*> da, db;
      std::vector<DotItem> host_items, dev_items;
      for (size_t i = 0; i < sizes.size(); ++i) {
        ha.push_back(random_bytes(ta, sizes[i], rng));
        hb.push_back(random_bytes(tb, sizes[i], rng));
        void *pa = nullptr, *pb = nullptr;
        // +elem offset on odd pairs exercises the unaligned (scalar) path
        const size_t off_a = (i % 2) * elem_size(ta), off_b = (i % 3 == 1) * elem_size(tb);
        CUDA_OK(cudaMalloc(&pa, ha.back().size() + off_a + 1));
        CUDA_OK(cudaMalloc(&pb, hb.back().size() + off_b + 1));
        CUDA_OK(cudaMemcpy(static_cast<char*>(pa) + off_a, ha.back().data(), ha.back().size(), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(static_cast<char*>(pb) + off_b, hb.back().data(), hb.back().size(), cudaMemcpyHostToDevice));
        da.push_back(pa);
        db.push_back(pb);
        const int64_t group = static_cast<int64_t>(i % 5);
        host_items.push_back({ha.back().data(), hb.back().data(), sizes[i], group, ta, tb});
        dev_items.push_back({static_cast<char*>(pa) + off_a, static_cast<char*>(pb) + off_b, sizes[i], group, ta, tb});
      }
      double want[5] = {0, 0, 0, 0, 0};
      dot_accumulate_serial(host_items.data(), static_cast<int64_t>(host_items.size()), want, kHostChunkElems);
      for (int use_double = 0; use_double < 2; ++use_double) {
        void* acc = nullptr;
        CUDA_OK(cudaMalloc(&acc, 5 * 8));
        CUDA_OK(cudaMemset(acc, 0, 5 * 8));
        CUDA_OK(dot_accumulate_cuda(dev_items.data(), static_cast<int64_t>(dev_items.size()), acc, use_double, nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        double got[5];
        if (use_double) {
          CUDA_OK(cudaMemcpy(got, acc, 5 * 8, cudaMemcpyDeviceToHost));
        } else {
          float gf[5];
          CUDA_OK(cudaMemcpy(gf, acc, 5 * 4, cudaMemcpyDeviceToHost));
          for (int g = 0; g < 5; ++g) got[g] = gf[g];
        }
        for (int g = 0; g < 5; ++g) {
          // sum of |a*b| bounds the rounding of an fp32 accumulation of these terms
          const double tol = use_double ? 1e-9 : 2e-3;
          if (std::fabs(got[g] - want[g]) > tol * (1 + std::fabs(want[g]))) {
            std::printf("FAIL dtypes %d/%d acc %s group %d: %.9g vs %.9g\n", ta, tb, use_double ? "f64" : "f32", g,
                        got[g], want[g]);
            ++failures;
          }
        }
        CUDA_OK(cudaFree(acc));
      }
      for (void* p : da) CUDA_OK(cudaFree(p));
      for (void* p : db) CUDA_OK(cudaFree(p));
    }
  }
  if (failures) return 1;
  std::printf("dot_cuda: all tests passed\n");
  return 0;
}
