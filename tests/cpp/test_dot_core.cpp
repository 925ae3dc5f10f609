// ctest for the plain C++ core: dtype conversions and grouped dots against a direct fp64 sum.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <vector>

#include "dot_core.h"

using namespace fastgeffect;

static int failures = 0;
#define EXPECT(cond, ...)                           \
  do {                                              \
    if (!(cond)) {                                  \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                     \
      std::printf("\n");                            \
      ++failures;                                   \
    }                                               \
  } while (0)

// Reference fp16 decoding by the textbook formula (sign, exponent, mantissa), independent of
// the bit-trick conversion under test.
static double f16_reference(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  double v;
  if (exp == 0) v = std::ldexp(man, -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(1024 + man, exp - 25);
  return sign ? -v : v;
}

static void test_f16_all_bit_patterns() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const double want = f16_reference(static_cast<uint16_t>(h));
    const float got = to_float(f16_raw{static_cast<uint16_t>(h)});
    if (std::isnan(want)) EXPECT(std::isnan(got), "fp16 0x%04x: expected nan", h);
    else EXPECT(got == want && std::signbit(got) == std::signbit(want), "fp16 0x%04x: %g vs %g", h, got, want);
  }
}

static void test_bf16() {
  EXPECT(to_float(bf16_raw{0x3F80}) == 1.0f, "bf16 1.0");
  EXPECT(to_float(bf16_raw{0xC040}) == -3.0f, "bf16 -3.0");
  EXPECT(to_float(bf16_raw{0x0001}) == std::ldexp(1.0, -133), "bf16 smallest subnormal");
  EXPECT(std::isinf(to_float(bf16_raw{0x7F80})), "bf16 inf");
}

// Random values exactly representable in fp16 and bf16 (few mantissa bits, small exponent),
// stored in each dtype, so every dtype pair must give the same exact fp64 answer.
struct Buffers {
  std::vector<float> f32;
  std::vector<double> f64;
  std::vector<f16_raw> f16;
  std::vector<bf16_raw> bf16;
  const void* ptr(DType t) const {
    switch (t) {
      case kF32: return f32.data();
      case kF16: return f16.data();
      case kBF16: return bf16.data();
      default: return f64.data();
    }
  }
};

static uint16_t encode_f16(double v) {  // exact for the values generated below
  if (v == 0) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  int e;
  const double m = std::frexp(std::fabs(v), &e);  // v = m * 2^e, m in [0.5, 1)
  const int exp = e - 1 + 15;
  const int man = static_cast<int>(std::ldexp(m * 2 - 1, 10));
  return static_cast<uint16_t>(sign | (exp << 10) | man);
}

static Buffers make_buffers(int64_t n, std::mt19937& rng) {
  std::uniform_int_distribution<int> mant(-64, 64), expo(-6, 4);
  Buffers buf;
  for (int64_t i = 0; i < n; ++i) {
    const double v = std::ldexp(mant(rng), expo(rng) - 6);  // <= 7 significant bits
    buf.f64.push_back(v);
    buf.f32.push_back(static_cast<float>(v));
    float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    buf.bf16.push_back({static_cast<uint16_t>(bits >> 16)});
    buf.f16.push_back({encode_f16(v)});
  }
  return buf;
}

static void test_grouped_dots() {
  std::mt19937 rng(1234);
  const int64_t sizes[] = {0, 1, 7, 4099, 3 * kHostChunkElems + 17, 33, 8};
  const int64_t groups[] = {2, 0, 1, 2, 0, 3, 1};
  const DType kinds[] = {kF32, kF16, kBF16, kF64};
  const int n_items = 7;
  std::vector<Buffers> as, bs;
  for (int i = 0; i < n_items; ++i) {
    as.push_back(make_buffers(sizes[i], rng));
    bs.push_back(make_buffers(sizes[i], rng));
  }
  double want[4] = {0, 0, 0, 0};
  for (int i = 0; i < n_items; ++i)
    for (int64_t k = 0; k < sizes[i]; ++k) want[groups[i]] += as[i].f64[k] * bs[i].f64[k];
  for (DType ta : kinds) {
    for (DType tb : kinds) {
      std::vector<DotItem> items;
      for (int i = 0; i < n_items; ++i) items.push_back({as[i].ptr(ta), bs[i].ptr(tb), sizes[i], groups[i], ta, tb});
      for (int64_t chunk : {int64_t{5}, int64_t{64}, kHostChunkElems}) {
        double got[4] = {0.5, 0, 0, 0};  // accumulates onto what is there
        dot_accumulate_serial(items.data(), n_items, got, chunk);
        got[0] -= 0.5;
        // Products of <=8-bit mantissas are exact in fp64 and the sums stay far below 2^53
        // ulps of the smallest term: every order of summation gives the exact value.
        for (int g = 0; g < 4; ++g)
          EXPECT(got[g] == want[g], "dtypes %d/%d chunk %lld group %d: %.17g vs %.17g", ta, tb,
                 static_cast<long long>(chunk), g, got[g], want[g]);
      }
    }
  }
}

static void test_plan_chunks() {
  DotItem items[3] = {{nullptr, nullptr, 10, 0, kF32, kF32}, {nullptr, nullptr, 0, 0, kF32, kF32},
                      {nullptr, nullptr, 4, 1, kF32, kF32}};
  const std::vector<DotChunk> c = plan_chunks(items, 3, 4);
  EXPECT(c.size() == 4, "expected 4 chunks, got %zu", c.size());
  if (c.size() == 4) {
    EXPECT(c[2].item == 0 && c[2].begin == 8 && c[2].end == 10, "ragged last chunk");
    EXPECT(c[3].item == 2 && c[3].begin == 0 && c[3].end == 4, "empty item skipped");
  }
  bool threw = false;
  try { plan_chunks(items, 3, 0); } catch (const std::invalid_argument&) { threw = true; }
  EXPECT(threw, "chunk size 0 must be rejected");
}

int main() {
  test_f16_all_bit_patterns();
  test_bf16();
  test_plan_chunks();
  test_grouped_dots();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("dot_core: all tests passed\n");
  return 0;
}
