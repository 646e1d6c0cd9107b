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
#include <type_traits>
#include <vector>

#include "common.h"

namespace dct_cpu {
namespace {

constexpr int64_t kTile = 1 << 14;        // outputs per merge task
constexpr int64_t kZeroChunk = 1 << 18;   // outputs zeroed per task

using dct::wire::values_offset;
namespace word = dct::wire;

size_t item_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

bool rows_fit(const PayloadRows& p) {
  return p.num_rows >= 1 && p.capacity >= 0 && p.numel >= 0 && p.buffers != nullptr &&
         known_dtype(p.value_dtype) &&
         p.row_bytes >= values_offset(p.capacity) +
                            static_cast<int64_t>(item_bytes(p.value_dtype)) * p.capacity;
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
    out[idx] = from_f32<O>(v);
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
    for (; j + 4 <= len; j += 4) _mm_stream_ps(dst + j, _mm_mul_ps(_mm_loadu_ps(sum + j), s));
    _mm_sfence();
  }
#endif
  for (; j < len; ++j) {
    // x / W, correctly rounded; for a power of two W that is exactly x * (1 / W).
    float v = DIVIDE ? sum[j] / ranks : sum[j] * scale;
    if (ACCUMULATE) v = to_f32(out[j]) + v;
    out[j] = from_f32<O>(v);
  }
}

template <typename V, typename O>
void decompress_many_typed(const PayloadRows& p, O* out, bool accumulate, bool average,
                           int64_t* errors, int threads) {
  const int W = p.num_rows;
  // The calling thread keeps its lists from call to call: fresh multi-megabyte allocations
  // come as new zeroed pages from the kernel every time, and their page faults cost more
  // than the merge itself (measured: 1 to 2 ms of 3-5 ms at 2^22, W = 8, 1%).
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

  const bool power_of_two = (W & (W - 1)) == 0;
  const bool divide = average && !power_of_two;
  const float ranks = static_cast<float>(W);
  const float scale = average ? 1.0f / ranks : 1.0f;  // exact for a power of two
  const int64_t tiles = ceil_div(p.numel, kTile);
  parallel_for(threads, tiles, [&](int64_t t) {
    const int64_t first = t * kTile, last = min64(p.numel, first + kTile);
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

}  // namespace dct_cpu
