// Host helpers shared by the kernels: magnitude keys, exact conversions, the wire's
// saturating cast, unaligned loads and stores, and the thread pool's parallel_for.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <new>
#include <stdexcept>
#include <string>

#include "../wire_format.h"
#include "dct_cpu.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace dct_cpu {

using dct::known_dtype;
using dct::known_index_bytes;

// Storage types: the 16-bit formats are handled as their bit patterns.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// Magnitude keys: |v|'s bit pattern with every NaN mapped to the largest key, so integer order
// is torch.topk(x.abs()) order (NaN > +inf > finite, -0 == +0).
template <typename T> struct KeyTraits;
template <> struct KeyTraits<float> {
  static constexpr uint32_t kAbsMask = 0x7FFFFFFFu, kInf = 0x7F800000u;
  static constexpr int kBits = 31;
  static uint32_t raw(float v) { return bits_of(v); }
};
template <> struct KeyTraits<Half> {
  static constexpr uint32_t kAbsMask = 0x7FFFu, kInf = 0x7C00u;
  static constexpr int kBits = 15;
  static uint32_t raw(Half v) { return v.bits; }
};
template <> struct KeyTraits<BFloat16> {
  static constexpr uint32_t kAbsMask = 0x7FFFu, kInf = 0x7F80u;
  static constexpr int kBits = 15;
  static uint32_t raw(BFloat16 v) { return v.bits; }
};

template <typename T>
inline uint32_t magnitude_key(T v) {
  const uint32_t b = KeyTraits<T>::raw(v) & KeyTraits<T>::kAbsMask;
  return b > KeyTraits<T>::kInf ? KeyTraits<T>::kAbsMask : b;
}

// Key of an fp32 threshold for |acc| >= t; a negative (non-NaN) threshold keeps everything.
inline uint32_t threshold_key(float t) {
  const uint32_t key = magnitude_key(t);
  const bool negative = (bits_of(t) >> 31) != 0 && key != 0x7FFFFFFFu;
  return negative ? 0u : key;
}

inline float to_f32(float v) { return v; }
inline float to_f32(BFloat16 v) { return float_of(static_cast<uint32_t>(v.bits) << 16); }
inline float to_f32(Half v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1Fu, mantissa = v.bits & 0x3FFu;
  if (exponent == 0x1F) return float_of(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in fp32.
  return float_of(sign | bits_of(static_cast<float>(mantissa) * 5.9604644775390625e-8f));
}

// fp32 -> T rounding to nearest even (what torch's .to(dtype) does); NaN to the canonical NaN.
template <typename T> T from_f32(float v);
template <> inline float from_f32<float>(float v) { return v; }
template <> inline BFloat16 from_f32<BFloat16>(float v) {
  const uint32_t u = bits_of(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return BFloat16{0x7FC0};
  return BFloat16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
template <> inline Half from_f32<Half>(float v) {
  const uint32_t u = bits_of(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return Half{0x7E00};
  if (a >= 0x477FF000u) return Half{static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520: inf
  if (a >= 0x38800000u) {  // a normal half: round the 13 dropped bits to nearest even
    const uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
    return Half{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
  }
  // Subnormal or zero: |v| * 2^24 < 1024 is exact; adding and subtracting 2^23 rounds it to
  // the nearest even integer (IEEE arithmetic, no fast-math), which is the half's mantissa.
  const float scaled = float_of(a) * 16777216.0f;
  const float rounded = (scaled + 8388608.0f) - 8388608.0f;
  return Half{static_cast<uint16_t>(sign | static_cast<uint16_t>(rounded))};
}

// A value stored into a dense output (decompress, decompress_many, decompress_rows): as
// from_f32, with a NaN made the canonical quiet NaN in fp32 too, as the torch reference writes
// it. A NaN's payload, or the sign x86 gives inf - inf, would otherwise depend on the backend.
template <typename O> inline O to_out(float v) {
  return from_f32<O>(v != v ? float_of(0x7FC00000u) : v);
}

inline bool is_finite(float v) { return (bits_of(v) & 0x7F800000u) != 0x7F800000u; }
inline bool is_nan(float v) { return (bits_of(v) & 0x7FFFFFFFu) > 0x7F800000u; }

// The wire cast: finite values saturate at T's largest finite value, inf passes, every NaN
// becomes the canonical quiet NaN (so every backend writes the same bytes).
template <typename T> T to_wire(float v);
template <> inline float to_wire<float>(float v) { return is_nan(v) ? float_of(0x7FC00000u) : v; }
template <> inline Half to_wire<Half>(float v) {
  if (is_finite(v)) v = v < -65504.0f ? -65504.0f : (v > 65504.0f ? 65504.0f : v);
  return from_f32<Half>(v);
}
template <> inline BFloat16 to_wire<BFloat16>(float v) {
  const float limit = 3.3895313892515355e38f;  // largest finite bf16
  if (is_finite(v)) v = v < -limit ? -limit : (v > limit ? limit : v);
  return from_f32<BFloat16>(v);
}

// float8_e4m3fn (wire format version 2): fp32 -> fp8 rounding to nearest even for finite
// |v| <= 448 (the codec's scales guarantee it), and fp8 -> fp32 (exact). Bias 7, 3 mantissa
// bits, subnormal step 2^-9, no inf; 0x7F / 0xFF are NaN.
inline uint8_t fp8_from_f32(float v) {
  const uint32_t u = bits_of(v);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x3C800000u) {  // >= 2^-6, a normal fp8: round the 20 dropped bits to nearest even
    const uint32_t rounded = (a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
    return static_cast<uint8_t>(sign | (rounded - (120u << 3)));
  }
  // Subnormal or zero: |v| * 2^9 < 8 is exact; adding and subtracting 2^23 rounds it to the
  // nearest even integer (IEEE arithmetic, no fast-math): the fp8 mantissa (8 = 2^-6 is the
  // first normal code, which the same bits encode).
  const float scaled = float_of(a) * 512.0f;
  const float rounded = (scaled + 8388608.0f) - 8388608.0f;
  return static_cast<uint8_t>(sign | static_cast<uint8_t>(rounded));
}

inline float fp8_to_f32(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exponent = (b >> 3) & 0xFu, mantissa = b & 7u;
  if (exponent == 0xF && mantissa == 7) return float_of(0x7FC00000u | sign);
  if (exponent == 0)  // mantissa * 2^-9, exact
    return float_of(sign | bits_of(static_cast<float>(mantissa) * 0.001953125f));
  return float_of(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// Unaligned access, for wire buffers that may start anywhere.
template <typename T>
inline T load(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void store(void* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// Bit j set when the magnitude key of acc[j] reaches tkey (int32 compare: every key and
// threshold key is below 2^31), for 16 consecutive fp32 values.
inline uint32_t keep_mask16(const float* acc, uint32_t tkey) {
#if defined(__SSE2__)
  const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF), inf = _mm_set1_epi32(0x7F800000);
  const __m128i below = _mm_set1_epi32(static_cast<int32_t>(tkey) - 1);  // key >= t: key > t-1
  uint32_t mask = 0;
  for (int q = 0; q < 4; ++q) {
    __m128i key = _mm_and_si128(_mm_castps_si128(_mm_loadu_ps(acc + 4 * q)), abs_mask);
    key = _mm_or_si128(key, _mm_and_si128(_mm_cmpgt_epi32(key, inf), abs_mask));  // NaN: top
    const __m128i keep = _mm_cmpgt_epi32(key, below);
    mask |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(keep))) << (4 * q);
  }
  return mask;
#else
  uint32_t mask = 0;
  for (int j = 0; j < 16; ++j) mask |= static_cast<uint32_t>(magnitude_key(acc[j]) >= tkey) << j;
  return mask;
#endif
}

// Bytes of one element of a float dtype (fp32 4, fp16 and bf16 2).
inline int64_t item_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }
// Bytes of one value in wire format version 2, by its value code.
inline int value_width(int code) {
  if (code == dct::wire::kCodeFloat8E4M3FN) return 1;
  return static_cast<int>(item_bytes(static_cast<DType>(code)));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Calls f with the C++ element type of a dtype code.
template <typename F>
auto dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(Half{});
    case DType::kBFloat16: return f(BFloat16{});
    default: return f(float{});
  }
}

// dispatch_float for two codes at once (an op's input and output types): f(A{}, B{}).
template <typename F>
auto dispatch_float2(DType a, DType b, F&& f) {
  return dispatch_float(a, [&](auto ta) {
    return dispatch_float(b, [&](auto tb) { return f(ta, tb); });
  });
}

template <typename F>
auto dispatch_index(int index_bytes, F&& f) {
  if (index_bytes == 2) return f(int16_t{});
  return f(int32_t{});
}

// Runs fn(0), ..., fn(tasks - 1) on up to `threads` threads: the caller's and those of a
// small persistent pool (std::thread; no OpenMP runtime to clash with torch's). With one
// task or one thread everything runs on the caller's thread. Which thread runs a task never
// changes a result: the kernels cut their work by size alone. An exception thrown by a task
// is rethrown here, after every started task has finished.
void parallel_for(int threads, int64_t tasks, const std::function<void(int64_t)>& fn);

// Keeps a message in thread-local storage, so a Status can point at it after the exception
// that carried it is gone (the binding reads it on the same thread, right away).
const char* keep_message(const char* what);

// Runs body() and turns what it throws into a Status naming the kernel.
template <typename F>
Status guarded(const char* where, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Status{1, where, "out of host memory"};
  } catch (const std::exception& e) {
    return Status{1, where, keep_message(e.what())};
  }
}

}  // namespace dct_cpu
