// decompress and decompress_many: checked scatter and the rank-ordered merge.
//
// Payloads are untrusted. Per row, the header must match the expected one (or the whole row
// is void) and the count is clamped to [0, capacity]. An entry is used only when its index
// lies in [0, numel) and is above every in-range index before it: one scan per row keeps
// that running highest. The used entries are then strictly ascending whatever the buffer
// holds, so every write is in bounds and no output is written twice by one row.
//
// decompress_many first lists each row's used entries (rows in parallel), then cuts the
// output into tiles that threads take in any order: a tile sums its outputs in an fp32
// buffer, rank 0's entries first, then rank 1's, ... (each row's entries of the tile found by
// binary search), then divides, adds to out and rounds once. Every output is
// 0 + d_0 + d_1 + ... in rank order whichever thread computed it: bitwise reproducible.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"

namespace dct_cpu {
namespace {

constexpr int64_t kTile = 1 << 14;        // outputs per merge task
constexpr int64_t kZeroChunk = 1 << 18;   // outputs zeroed per task

using dct::wire::values_offset;
namespace word = dct::wire;

bool rows_fit(const PayloadRows& p) {
  return p.num_rows >= 1 && p.capacity >= 0 && p.numel >= 0 && p.buffers != nullptr &&
         known_dtype(p.value_dtype) &&
         p.row_bytes >= values_offset(p.capacity) + item_bytes(p.value_dtype) * p.capacity;
}

// The usable count of row w (0 for a void row); *errors gets 1 for a bad header or count.
int64_t row_count(const PayloadRows& p, int w, int64_t* errors) {
  const uint8_t* row = p.buffers + w * p.row_bytes;
  bool header_ok =
      load<int32_t>(row + 4 * word::kWordCapacity) == static_cast<int32_t>(p.capacity);
  // Expected words: magic, version | codes, numel low, numel high (words 0 to 3).
  for (int i = 0; i < 4; ++i) header_ok &= load<int32_t>(row + 4 * i) == p.expected_header[i];
  const int64_t claimed = load<int32_t>(row + 4 * word::kWordCount);
  const bool count_ok = claimed >= 0 && claimed <= p.capacity;
  if (!header_ok || !count_ok) ++*errors;
  return header_ok ? min64(max64(claimed, 0), p.capacity) : 0;
}

// Calls use(slot, index) for every used entry of row w, in slot order; returns the number of
// entries below the count that were skipped.
template <typename F>
int64_t scan_row(const PayloadRows& p, int w, int64_t count, F&& use) {
  const uint8_t* indices = p.buffers + w * p.row_bytes + word::kHeaderBytes;
  int64_t highest = -1, skipped = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t idx = load<int32_t>(indices + word::kIndexBytes * i);
    if (idx > highest && idx < p.numel) {  // highest >= -1, so idx >= 0
      use(i, idx);
      highest = idx;
    } else {
      ++skipped;
    }
  }
  return skipped;
}

template <typename O>
void zero(O* out, int64_t n, int threads) {
  const int64_t tasks = ceil_div(n, kZeroChunk);
  parallel_for(threads, tasks, [&](int64_t t) {
    const int64_t begin = t * kZeroChunk, end = min64(n, begin + kZeroChunk);
    std::memset(static_cast<void*>(out + begin), 0, sizeof(O) * (end - begin));  // +0 bits
  });
}

template <typename V, typename O>
void decompress_typed(const PayloadRows& p, O* out, bool accumulate, int64_t* errors,
                      int threads) {
  if (!accumulate) zero(out, p.numel, threads);
  const int64_t count = row_count(p, 0, errors);
  const uint8_t* values = p.buffers + values_offset(p.capacity);
  *errors += scan_row(p, 0, count, [&](int64_t i, int64_t idx) {
    float v = to_f32(load<V>(values + sizeof(V) * i));
    if (accumulate) v = to_f32(out[idx]) + v;
    out[idx] = to_out<O>(v);
  });
}

struct Entries {
  std::vector<int32_t> index;
  std::vector<float> value;
};

template <typename O, bool ACCUMULATE, bool DIVIDE>
void finish(const float* sum, O* out, int64_t len, float scale, float ranks) {
  int64_t j = 0;
#if defined(__SSE2__)
  // fp32 out, overwritten: streaming stores, so the output is not read in before it is
  // written (it is written once and is far larger than the caches' share of one call).
  if (std::is_same<O, float>::value && !ACCUMULATE && !DIVIDE &&
      reinterpret_cast<uintptr_t>(out) % 16 == 0) {
    float* dst = reinterpret_cast<float*>(out);
    const __m128 s = _mm_set1_ps(scale);
    const __m128 canonical = _mm_castsi128_ps(_mm_set1_epi32(0x7FC00000));
    for (; j + 4 <= len; j += 4) {
      const __m128 v = _mm_mul_ps(_mm_loadu_ps(sum + j), s);
      const __m128 nan = _mm_cmpunord_ps(v, v);  // as to_out: NaN made canonical
      _mm_stream_ps(dst + j, _mm_or_ps(_mm_andnot_ps(nan, v), _mm_and_ps(nan, canonical)));
    }
    _mm_sfence();
  }
#endif
  for (; j < len; ++j) {
    // x / W, correctly rounded; for a power of two W that is exactly x * (1 / W).
    float v = DIVIDE ? sum[j] / ranks : sum[j] * scale;
    if (ACCUMULATE) v = to_f32(out[j]) + v;
    out[j] = to_out<O>(v);
  }
}

template <typename O>
void merge(const std::vector<Entries>& rows, int W, int64_t numel, O* out, bool accumulate,
           bool average, int threads);

template <typename V, typename O>
void decompress_many_typed(const PayloadRows& p, O* out, bool accumulate, bool average,
                           int64_t* errors, int threads) {
  const int W = p.num_rows;
  // The calling thread keeps its lists from call to call: fresh multi-megabyte allocations
  // come as new zeroed pages from the kernel every time, and their page faults are a large
  // part of a call that only reads each row once (see bench/NOTES.md).
  thread_local std::vector<Entries> kept_lists;
  if (kept_lists.size() < static_cast<size_t>(W)) kept_lists.resize(W);
  std::vector<Entries>& rows = kept_lists;
  std::vector<int64_t> row_errors(W, 0);
  parallel_for(threads, p.capacity >= 4096 ? W : 1, [&](int64_t task) {
    const int first = p.capacity >= 4096 ? static_cast<int>(task) : 0;
    const int last = p.capacity >= 4096 ? first + 1 : W;
    for (int w = first; w < last; ++w) {
      int64_t e = 0;
      const int64_t count = row_count(p, w, &e);
      const uint8_t* values = p.buffers + w * p.row_bytes + values_offset(p.capacity);
      Entries& r = rows[w];
      r.index.resize(count);
      r.value.resize(count);
      int32_t* index = r.index.data();
      float* value = r.value.data();
      int64_t used = 0;
      e += scan_row(p, w, count, [&](int64_t i, int64_t idx) {
        index[used] = static_cast<int32_t>(idx);
        value[used] = to_f32(load<V>(values + sizeof(V) * i));
        ++used;
      });
      r.index.resize(used);
      r.value.resize(used);
      row_errors[w] = e;
    }
  });
  for (int64_t e : row_errors) *errors += e;
  merge(rows, W, p.numel, out, accumulate, average, threads);
}

// out = [out +] (0 + rows[0] + ... + rows[W-1]) [/ W] from each row's ascending entries: the
// output cut into tiles, each summed in fp32 in rank order (see the top of this file).
template <typename O>
void merge(const std::vector<Entries>& rows, int W, int64_t numel, O* out, bool accumulate,
           bool average, int threads) {
  const bool power_of_two = (W & (W - 1)) == 0;
  const bool divide = average && !power_of_two;
  const float ranks = static_cast<float>(W);
  const float scale = average ? 1.0f / ranks : 1.0f;  // exact for a power of two
  const int64_t tiles = ceil_div(numel, kTile);
  parallel_for(threads, tiles, [&](int64_t t) {
    const int64_t first = t * kTile, last = min64(numel, first + kTile);
    thread_local std::vector<float> buffer;
    buffer.assign(kTile, 0.0f);
    float* sum = buffer.data();
    for (int w = 0; w < W; ++w) {
      const std::vector<int32_t>& index = rows[w].index;
      size_t j = std::lower_bound(index.begin(), index.end(), first) - index.begin();
      const float* value = rows[w].value.data();
      for (; j < index.size() && index[j] < last; ++j) sum[index[j] - first] += value[j];
    }
    const int64_t len = last - first;
    if (accumulate) {
      if (divide) finish<O, true, true>(sum, out + first, len, scale, ranks);
      else finish<O, true, false>(sum, out + first, len, scale, ranks);
    } else {
      if (divide) finish<O, false, true>(sum, out + first, len, scale, ranks);
      else finish<O, false, false>(sum, out + first, len, scale, ranks);
    }
  });
}

// ------------------------------------------------------------------ wire format version 2

uint32_t field_bits(const uint8_t* p, int width) {
  if (width == 1) return *p;
  if (width == 2) return load<uint16_t>(p);
  return load<uint32_t>(p);
}

float field_value(uint32_t bits, int code) {
  switch (code) {
    case dct::wire::kCodeFloat32: return float_of(bits);
    case dct::wire::kCodeFloat16: return to_f32(Half{static_cast<uint16_t>(bits)});
    case dct::wire::kCodeBFloat16: return to_f32(BFloat16{static_cast<uint16_t>(bits)});
    default: return fp8_to_f32(static_cast<uint8_t>(bits));
  }
}

bool scale_ok(float s) {
  if (!is_finite(s) || !(s > 0.0f)) return false;
  int e = 0;
  const float m = std::frexp(s, &e);
  return m == 0.5f && e - 1 >= -140 && e - 1 <= 127;
}

// The usable entries of version-2 row w (ascending positions, fp32 values), as
// dct_kernels/codec.py's decode has them; returns the errors it counts.
int64_t decode_row_v2(const WireV2& wire, const uint8_t* row, int64_t numel,
                      const int32_t* expected, Entries& entries) {
  entries.index.clear();
  entries.value.clear();
  const int words[] = {dct::wire::kWordMagic, dct::wire::kWordVersionCodes,
                       dct::wire::kWordNumelLow, dct::wire::kWordNumelHigh,
                       dct::wire::kWordCapacity, dct::wire::kWordScales};
  bool row_ok = true;
  for (int w : words) row_ok &= load<int32_t>(row + 4 * w) == expected[w];
  const bool fp8 = wire.value_code == dct::wire::kCodeFloat8E4M3FN;
  const int64_t S = wire.num_scales;
  std::vector<float> scales;
  std::vector<int64_t> bounds;
  if (row_ok && fp8) {
    bounds.resize(S + 1);
    for (int64_t s = 0; s <= S; ++s) bounds[s] = load<int32_t>(row + wire.bounds_offset + 4 * s);
    row_ok &= bounds[0] == 0 && bounds[S] == numel;
    for (int64_t s = 0; s < S && row_ok; ++s) row_ok &= bounds[s + 1] >= bounds[s];
    scales.resize(S);
    for (int64_t s = 0; s < S && row_ok; ++s) {
      scales[s] = load<float>(row + wire.scales_offset + 4 * s);
      row_ok &= scale_ok(scales[s]);
    }
  }
  if (!row_ok) return 1;
  const int64_t claimed = load<int32_t>(row + 4 * dct::wire::kWordCount);
  int64_t errors = claimed >= 0 && claimed <= wire.capacity ? 0 : 1;
  const int64_t count = min64(max64(claimed, 0), wire.capacity);
  entries.index.resize(count);
  entries.value.resize(count);
  int32_t* out_index = entries.index.data();
  float* out_value = entries.value.data();
  int64_t used = 0, segment = 0;
  const int width = value_width(wire.value_code);
  const uint8_t* codes = row + wire.indices_offset;
  const uint8_t* fields = row + wire.values_offset;
  // fp8 values decode through a table; positions rise, so the scale segment only moves on.
  static const std::vector<float> fp8_table = [] {
    std::vector<float> t(256);
    for (int b = 0; b < 256; ++b) t[b] = fp8_to_f32(static_cast<uint8_t>(b));
    return t;
  }();
  auto emit = [&](int64_t position, uint32_t bits) {
    float v;
    if (fp8) {
      while (segment + 1 < S && bounds[segment + 1] <= position) ++segment;
      v = fp8_table[bits & 0xFFu] * scales[segment];
    } else {
      v = field_value(bits, wire.value_code);
    }
    out_index[used] = static_cast<int32_t>(position);
    out_value[used] = v;
    ++used;
  };
  if (wire.delta) {
    int64_t position = -1;
    bool broken = false;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t code = load<uint16_t>(codes + 2 * i);
      const uint32_t bits = field_bits(fields + width * i, width);
      if (code == 0) {  // an escape
        const int64_t multiplier = static_cast<int64_t>(bits) + 1;
        if (multiplier > 32768) {
          if (!broken) ++errors;  // one per row; every entry after it is skipped
          broken = true;
        } else {
          position += 65535 * multiplier;
        }
        continue;
      }
      position += code;
      if (!broken && position < numel) emit(position, bits);
      else ++errors;
    }
    if (count > 0 && load<uint16_t>(codes + 2 * (count - 1)) == 0) ++errors;  // dangling
  } else {
    int64_t highest = -1;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t position = load<int32_t>(codes + 4 * i);
      if (position > highest && position < numel) {  // highest >= -1, so position >= 0
        emit(position, field_bits(fields + width * i, width));
        highest = position;
      } else {
        ++errors;
      }
    }
  }
  entries.index.resize(used);
  entries.value.resize(used);
  return errors;
}

// The common part of decompress and decompress_many after their argument checks: calls
// typed(V{}, O{}, &count) with the element types of the payload's values and of out, inside
// guarded(op), then adds the errors it counted to *errors.
template <typename F>
Status run_counting_errors(const char* op, const PayloadRows& p, DType out_dtype,
                           int32_t* errors, F&& typed) {
  return guarded(op, [&] {
    int64_t e = 0;
    dispatch_float2(p.value_dtype, out_dtype, [&](auto vtag, auto otag) {
      typed(vtag, otag, &e);
      return 0;
    });
    *errors += static_cast<int32_t>(e);
    return Status{};
  });
}

}  // namespace

Status decompress(const PayloadRows& p, void* out, DType out_dtype, bool accumulate,
                  int32_t* errors, int threads) {
  if (!rows_fit(p) || p.num_rows != 1 || !known_dtype(out_dtype))
    return Status{1, "decompress", "bad arguments (rows shorter than the capacity needs?)"};
  return run_counting_errors("decompress", p, out_dtype, errors,
                             [&](auto vtag, auto otag, int64_t* e) {
    using O = decltype(otag);
    decompress_typed<decltype(vtag), O>(p, static_cast<O*>(out), accumulate, e, threads);
  });
}

Status decompress_many(const PayloadRows& p, void* out, DType out_dtype, bool accumulate,
                       bool average, int32_t* errors, int threads) {
  if (!rows_fit(p) || !known_dtype(out_dtype))
    return Status{1, "decompress_many", "bad arguments (rows shorter than the capacity needs?)"};
  return run_counting_errors("decompress_many", p, out_dtype, errors,
                             [&](auto vtag, auto otag, int64_t* e) {
    using O = decltype(otag);
    decompress_many_typed<decltype(vtag), O>(p, static_cast<O*>(out), accumulate, average, e,
                                             threads);
  });
}

Status decompress_v2(const WireV2& wire, const uint8_t* buffers, int num_rows,
                     int64_t row_bytes, int64_t numel, const int32_t* expected, void* out,
                     DType out_dtype, bool accumulate, bool average, bool many,
                     int32_t* errors, int threads) {
  // Positions are narrowed to int32 below: a larger output could not be addressed.
  if (buffers == nullptr || num_rows < 1 || (!many && num_rows != 1) || numel < 0 ||
      numel > INT32_MAX || wire.capacity < 0 || !known_value_code(wire.value_code) ||
      !known_dtype(out_dtype) ||
      row_bytes < wire.values_offset + value_width(wire.value_code) * wire.capacity)
    return Status{1, "decompress_v2", "bad arguments"};
  return guarded("decompress_v2", [&] {
    // As in decompress_many: the calling thread keeps its lists from call to call. Taken by
    // reference, so that the pool's threads fill the caller's lists, not their own.
    thread_local std::vector<Entries> kept_lists;
    if (kept_lists.size() < static_cast<size_t>(num_rows)) kept_lists.resize(num_rows);
    std::vector<Entries>& lists = kept_lists;
    std::vector<int64_t> row_errors(num_rows, 0);
    const bool split = wire.capacity >= 4096;
    parallel_for(threads, split ? num_rows : 1, [&](int64_t task) {
      const int first = split ? static_cast<int>(task) : 0;
      const int last = split ? first + 1 : num_rows;
      for (int w = first; w < last; ++w)
        row_errors[w] = decode_row_v2(wire, buffers + w * row_bytes, numel, expected,
                                      lists[w]);
    });
    int64_t e = 0;
    for (int64_t r : row_errors) e += r;
    dispatch_float(out_dtype, [&](auto otag) {
      using O = decltype(otag);
      O* o = static_cast<O*>(out);
      if (many) {
        merge(lists, num_rows, numel, o, accumulate, average, threads);
      } else {  // decompress: overwrite (zeros elsewhere) or add, at ascending positions
        if (!accumulate) zero(o, numel, threads);
        const Entries& r = lists[0];
        for (size_t j = 0; j < r.index.size(); ++j) {
          float v = r.value[j];
          if (accumulate) v = to_f32(o[r.index[j]]) + v;
          o[r.index[j]] = to_out<O>(v);
        }
      }
      return 0;
    });
    *errors += static_cast<int32_t>(e);
    return Status{};
  });
}

}  // namespace dct_cpu
