// The vector pass of the cpu row top-k: which keys of an fp32 row reach a bound, as a bitmap,
// with the widest vectors the CPU has (AVX-512F, AVX2 or SSE2, chosen once at run time).
//
// Every implementation computes the same bits (integer compares of the magnitude keys), so the
// choice never changes a result; tests force each one in turn (set_key_scan_isa).
#pragma once

#include <cstdint>

#include "common.h"

namespace dct_cpu {

// The plain loop, for any key type: the words of columns [from, columns), from a multiple of
// 64 (the vector versions' tail, and the whole row of the 16-bit formats).
template <typename T>
void keys_at_least_scalar(const T* row, int64_t from, int64_t columns, uint32_t lo,
                          uint64_t* bits) {
  for (int64_t w = from / 64; w * 64 < columns; ++w) {
    const int64_t end = min64(columns, (w + 1) * 64);
    uint64_t word = 0;
    for (int64_t c = w * 64; c < end; ++c)
      word |= static_cast<uint64_t>(magnitude_key(row[c]) >= lo) << (c - w * 64);
    bits[w] = word;
  }
}

// Bit c % 64 of bits[c / 64] is set when magnitude_key(row[c]) >= lo, for c < columns; the
// bits of the last word past columns are 0. bits holds ceil(columns / 64) words.
void keys_at_least(const float* row, int64_t columns, uint32_t lo, uint64_t* bits);

// The implementations this build and CPU can run, lowest first: "scalar", "sse2", "avx2",
// "avx512f". The one in use starts as the last of them.
const char* const* key_scan_isas(int* count);
const char* key_scan_isa();
// Selects an implementation by name; false (and nothing changed) when it cannot run here.
bool set_key_scan_isa(const char* name);

}  // namespace dct_cpu
