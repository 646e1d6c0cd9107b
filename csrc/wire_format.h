// The wire format of a compressed payload (docs/design.md#wire-format): the one C++
// definition of its layout, for the CUDA kernels and any host code (no CUDA header here).
// dct_kernels/payload.py is the one Python definition; tests/test_payload.py checks that the
// two agree.
//
// A version-1 payload is one little-endian byte buffer: a header of kHeaderWords int32 words,
// then `capacity` int32 indices from byte kHeaderBytes, then `capacity` values from
// values_offset(capacity); the buffer ends at buffer_bytes(capacity, value size).
//
// Version 2 (fp8 values or delta-coded indices) keeps the header and its codes, adds the codes
// below and puts S, the number of fp8 scale segments, in the reserved word. The byte offsets
// of its fields depend on S and the index encoding; only payload.py computes them (wire_layout),
// and the cpu core takes them from its caller.
#pragma once

#include <cstdint>

namespace dct {
namespace wire {

constexpr int64_t kHeaderBytes = 32;
constexpr int kHeaderWords = 8;

// The header's fields as int32 words (how the kernels read it).
constexpr int kWordMagic = 0;         // ASCII "DCTK"
constexpr int kWordVersionCodes = 1;  // version (uint16) | value code << 16 | index code << 24
constexpr int kWordNumelLow = 2;      // numel, int64, low word first
constexpr int kWordNumelHigh = 3;
constexpr int kWordCapacity = 4;
constexpr int kWordCount = 5;         // entries sent (written by compress)
constexpr int kWordOverflow = 6;      // entries that passed but did not fit
constexpr int kWordReserved = 7;

constexpr int kFormatVersion = 1;
constexpr int kValueCodeShift = 16;  // byte 6 of the header
constexpr int kIndexCodeShift = 24;  // byte 7

// Value dtype codes (byte 6) and the index dtype code (byte 7).
constexpr int kCodeFloat32 = 0;
constexpr int kCodeFloat16 = 1;
constexpr int kCodeBFloat16 = 2;
constexpr int kIndexCodeInt32 = 0;

// Version 2.
constexpr int kFormatVersion2 = 2;
constexpr int kWordScales = 7;          // S, in the word version 1 reserves
constexpr int kCodeFloat8E4M3FN = 3;    // value code: float8_e4m3fn, scaled per segment
constexpr int kIndexCodeDelta16 = 1;    // index code: uint16 gaps, 0 an escape

constexpr int64_t kIndexBytes = 4;   // int32 indices
constexpr int64_t kAlignBytes = 16;  // the values start, and the buffer ends, on this multiple

constexpr int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// Byte offset of the values in a version-1 payload of `capacity` slots.
constexpr int64_t values_offset(int64_t capacity) {
  return round_up(kHeaderBytes + kIndexBytes * capacity, kAlignBytes);
}

// Bytes of a whole version-1 payload of `capacity` slots whose values take `value_bytes` each.
constexpr int64_t buffer_bytes(int64_t capacity, int64_t value_bytes) {
  return round_up(values_offset(capacity) + value_bytes * capacity, kAlignBytes);
}

}  // namespace wire
}  // namespace dct
