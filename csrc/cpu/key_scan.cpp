// keys_at_least (key_scan.h): the SSE2 version is x86-64's baseline; the AVX2 and AVX-512F
// versions are compiled for those extensions alone (function target attributes, so the rest
// of the module still runs on any x86-64) and used only where the CPU reports them. On a
// 512-wide ReLU row this pass was half of compress_rows' time with 4-lane compares.
//
// The fp32 key is |bits| with every NaN raised to 0x7FFFFFFF. For lo <= 0x7F800001 that
// raising changes no comparison (a NaN's |bits| is at least 0x7F800001), so the vector
// versions compare |bits| directly and leave the rare larger bound (a row whose k-th key is a
// NaN) to the scalar loop.
#include "key_scan.h"

#include <atomic>
#include <cstring>

#include "common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DCT_X86 1
#endif

namespace dct_cpu {
namespace {

constexpr uint32_t kVectorBound = 0x7F800001u;  // lo above this: scalar (see above)

void scan_scalar(const float* row, int64_t columns, uint32_t lo, uint64_t* bits) {
  keys_at_least_scalar(row, 0, columns, lo, bits);
}

#if DCT_X86
void scan_sse2(const float* row, int64_t columns, uint32_t lo, uint64_t* bits) {
  if (lo > kVectorBound) return scan_scalar(row, columns, lo, bits);
  // key > lo - 1, signed: keys are below 2^31, and lo = 0 gives -1 (every key passes).
  const __m128i below = _mm_set1_epi32(static_cast<int32_t>(lo) - 1);
  const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF);
  int64_t w = 0;
  for (; (w + 1) * 64 <= columns; ++w) {
    const float* p = row + w * 64;
    uint64_t word = 0;
    for (int q = 0; q < 16; ++q) {
      const __m128i key =
          _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4 * q)), abs_mask);
      const int m = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(key, below)));
      word |= static_cast<uint64_t>(m) << (4 * q);
    }
    bits[w] = word;
  }
  keys_at_least_scalar(row, w * 64, columns, lo, bits);
}

__attribute__((target("avx2"))) void scan_avx2(const float* row, int64_t columns, uint32_t lo,
                                                uint64_t* bits) {
  if (lo > kVectorBound) return scan_scalar(row, columns, lo, bits);
  const __m256i below = _mm256_set1_epi32(static_cast<int32_t>(lo) - 1);
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  int64_t w = 0;
  for (; (w + 1) * 64 <= columns; ++w) {
    const float* p = row + w * 64;
    uint64_t word = 0;
    for (int q = 0; q < 8; ++q) {
      const __m256i key = _mm256_and_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8 * q)), abs_mask);
      const int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below)));
      word |= static_cast<uint64_t>(static_cast<uint32_t>(m)) << (8 * q);
    }
    bits[w] = word;
  }
  keys_at_least_scalar(row, w * 64, columns, lo, bits);
}

__attribute__((target("avx512f"))) void scan_avx512(const float* row, int64_t columns,
                                                     uint32_t lo, uint64_t* bits) {
  if (lo > kVectorBound) return scan_scalar(row, columns, lo, bits);
  const __m512i below = _mm512_set1_epi32(static_cast<int32_t>(lo) - 1);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  int64_t w = 0;
  for (; (w + 1) * 64 <= columns; ++w) {
    const float* p = row + w * 64;
    uint64_t word = 0;
    for (int q = 0; q < 4; ++q) {
      const __m512i key = _mm512_and_si512(_mm512_loadu_si512(p + 16 * q), abs_mask);
      word |= static_cast<uint64_t>(_mm512_cmpgt_epi32_mask(key, below)) << (16 * q);
    }
    bits[w] = word;
  }
  keys_at_least_scalar(row, w * 64, columns, lo, bits);
}
#endif

using ScanFn = void (*)(const float*, int64_t, uint32_t, uint64_t*);

struct Isa {
  const char* name;
  ScanFn fn;
};

// The implementations this CPU can run, lowest first.
struct Table {
  Isa isas[4];
  int count = 0;
  Table() {
    isas[count++] = {"scalar", scan_scalar};
#if DCT_X86
    isas[count++] = {"sse2", scan_sse2};
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) isas[count++] = {"avx2", scan_avx2};
    if (__builtin_cpu_supports("avx512f")) isas[count++] = {"avx512f", scan_avx512};
#endif
  }
};

const Table& table() {
  static const Table t;
  return t;
}

std::atomic<int>& chosen() {
  static std::atomic<int> index{table().count - 1};
  return index;
}

}  // namespace

void keys_at_least(const float* row, int64_t columns, uint32_t lo, uint64_t* bits) {
  table().isas[chosen().load(std::memory_order_relaxed)].fn(row, columns, lo, bits);
}

const char* const* key_scan_isas(int* count) {
  static const char* names[4];
  const Table& t = table();
  for (int i = 0; i < t.count; ++i) names[i] = t.isas[i].name;
  *count = t.count;
  return names;
}

const char* key_scan_isa() { return table().isas[chosen().load()].name; }

bool set_key_scan_isa(const char* name) {
  const Table& t = table();
  for (int i = 0; i < t.count; ++i)
    if (std::strcmp(t.isas[i].name, name) == 0) {
      chosen().store(i);
      return true;
    }
  return false;
}

}  // namespace dct_cpu
