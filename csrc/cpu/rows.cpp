// Per-row top-k (compress_rows), its inverse (decompress_rows) and gather_rows.
//
// compress_rows, per row: a 256-bin histogram of the keys' top 8 bits finds the bin that holds
// the k-th largest key; the keys of that bin (a few percent of the row for typical data, all
// of it at worst) are copied out and nth_element picks the k-th largest, kth. One more pass
// (16 keys per vector test for fp32) keeps every key above kth plus the first
// (k - count above) keys equal to it, in column order, so columns come out ascending. Exactly k entries per row, ties to the lower column,
// NaN above +inf. Rows are dealt to threads in groups; each row's result depends on that row
// alone.
#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace dct_cpu {
namespace {

constexpr int64_t kGroupElements = 1 << 15;  // elements per task (whole rows)

int64_t rows_per_task(int64_t rows, int64_t columns) {
  return max64(1, min64(rows, kGroupElements / max64(columns, 1)));
}

// Keys of 4 consecutive fp32 values (NaN as the largest key).
#if defined(__SSE2__)
inline __m128i keys4(const float* p) {
  const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF), inf = _mm_set1_epi32(0x7F800000);
  __m128i key = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), abs_mask);
  return _mm_or_si128(key, _mm_and_si128(_mm_cmpgt_epi32(key, inf), abs_mask));
}
#endif

// Bit j (j < 16) set when the key of row[c + j] is >= lo and <= hi (keys of 31 bits).
template <typename T>
inline uint32_t in_range16(const T* row, int64_t c, uint32_t lo, uint32_t hi) {
#if defined(__SSE2__)
  if (std::is_same<T, float>::value) {
    const float* f = reinterpret_cast<const float*>(row) + c;
    const __m128i below = _mm_set1_epi32(static_cast<int32_t>(lo) - 1);
    const __m128i above = _mm_set1_epi32(static_cast<int32_t>(hi));
    uint32_t mask = 0;
    for (int q = 0; q < 4; ++q) {
      const __m128i key = keys4(f + 4 * q);
      const __m128i in = _mm_andnot_si128(_mm_cmpgt_epi32(key, above),
                                          _mm_cmpgt_epi32(key, below));
      mask |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(in))) << (4 * q);
    }
    return mask;
  }
#endif
  uint32_t mask = 0;
  for (int j = 0; j < 16; ++j) {
    const uint32_t key = magnitude_key(row[c + j]);
    mask |= static_cast<uint32_t>(key >= lo && key <= hi) << j;
  }
  return mask;
}

// Calls f(column, key) for the columns whose key lies in [lo, hi], in column order.
template <typename T, typename F>
inline void for_keys_in(const T* row, int64_t columns, uint32_t lo, uint32_t hi, F&& f) {
  int64_t c = 0;
  for (; c + 16 <= columns; c += 16) {
    for (uint32_t mask = in_range16(row, c, lo, hi); mask; mask &= mask - 1) {
      const int j = __builtin_ctz(mask);
      f(c + j, magnitude_key(row[c + j]));
    }
  }
  for (; c < columns; ++c) {
    const uint32_t key = magnitude_key(row[c]);
    if (key >= lo && key <= hi) f(c, key);
  }
}

template <typename T, typename W, typename I>
void compress_row(const T* row, int64_t columns, int64_t k, I* idx_out, W* val_out,
                  std::vector<uint32_t>& pool) {
  constexpr int kShift = KeyTraits<T>::kBits - 8;
  // Four interleaved histograms: neighbouring elements often share a bin, and one table
  // would serialize on the repeated increments.
  uint32_t hist[4][256] = {};
  int64_t c = 0;
  for (; c + 4 <= columns; c += 4)
    for (int e = 0; e < 4; ++e) ++hist[e][magnitude_key(row[c + e]) >> kShift];
  for (; c < columns; ++c) ++hist[0][magnitude_key(row[c]) >> kShift];
  int64_t rank = k, bin = 255, above = 0;
  for (; bin >= 0; --bin) {
    const int64_t here = int64_t(hist[0][bin]) + hist[1][bin] + hist[2][bin] + hist[3][bin];
    if (above + here >= rank) {
      rank -= above;
      break;
    }
    above += here;
  }
  // The keys of the deciding bin, and the rank-th largest of them.
  const uint32_t bin_lo = static_cast<uint32_t>(bin) << kShift;
  const uint32_t bin_hi = bin_lo | ((1u << kShift) - 1u);
  pool.clear();
  for_keys_in(row, columns, bin_lo, bin_hi, [&](int64_t, uint32_t key) { pool.push_back(key); });
  std::nth_element(pool.begin(), pool.begin() + (rank - 1), pool.end(),
                   std::greater<uint32_t>());
  const uint32_t kth = pool[rank - 1];
  for (uint32_t key : pool) above += key > kth;
  // Every key above kth, and the first (k - above) equal to it: columns ascending.
  int64_t ties_left = k - above, slot = 0;
  for_keys_in(row, columns, kth, 0x7FFFFFFFu, [&](int64_t j, uint32_t key) {
    if (key == kth) {
      if (ties_left == 0) return;
      --ties_left;
    }
    idx_out[slot] = static_cast<I>(j);
    val_out[slot] = to_wire<W>(to_f32(row[j]));
    ++slot;
  });
}

// compress_rows and decompress_rows: f(A{}, B{}, I{}) with the element types of their two
// dtype codes and the index type of their index width.
template <typename F>
auto dispatch_rows(DType a, DType b, int index_bytes, F&& f) {
  return dispatch_float2(a, b, [&](auto ta, auto tb) {
    return dispatch_index(index_bytes, [&](auto ti) { return f(ta, tb, ti); });
  });
}

// Runs fn(first, last) for the rows [first, last) of each task, `per` whole rows a task, on up
// to `threads` threads.
template <typename F>
void for_row_groups(int threads, int64_t rows, int64_t per, F&& fn) {
  parallel_for(threads, ceil_div(rows, per),
               [&](int64_t task) { fn(task * per, min64(rows, (task + 1) * per)); });
}

template <typename T, typename W, typename I>
void compress_rows_typed(const T* x, int64_t rows, int64_t columns, int64_t k, I* indices,
                         W* values, int threads) {
  for_row_groups(threads, rows, rows_per_task(rows, columns), [&](int64_t first, int64_t last) {
    std::vector<uint32_t> pool;
    for (int64_t r = first; r < last; ++r)
      compress_row<T, W, I>(x + r * columns, columns, k, indices + r * k, values + r * k, pool);
  });
}

template <typename I, typename V, typename O>
void decompress_rows_typed(const I* indices, const V* values, int64_t rows, int64_t columns,
                           int64_t k, O* out, int threads) {
  for_row_groups(threads, rows, rows_per_task(rows, columns), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      O* row = out + r * columns;
      std::memset(static_cast<void*>(row), 0, sizeof(O) * columns);  // +0 bits
      const I* idx = indices + r * k;
      const V* val = values + r * k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t col = idx[j];
        if (col >= 0 && col < columns) row[col] = from_f32<O>(to_f32(val[j]));
      }
    }
  });
}

template <typename T, typename I>
void gather_rows_typed(const T* y, int64_t rows, int64_t columns, int64_t k, const I* indices,
                       T* out, int threads) {
  const int64_t per = max64(1, min64(rows, kGroupElements / max64(k, 1)));
  for_row_groups(threads, rows, per, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* src = y + r * columns;
      const I* idx = indices + r * k;
      T* dst = out + r * k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t col = idx[j];
        // A bitwise copy (NaN payloads included), +0 outside the row.
        dst[j] = (col >= 0 && col < columns) ? src[col] : T{};
      }
    }
  });
}

}  // namespace

Status compress_rows(const void* x, DType dtype, int64_t rows, int64_t columns, int64_t k,
                     void* indices, int index_bytes, void* values, DType value_dtype,
                     int threads) {
  if (!known_dtype(dtype) || !known_dtype(value_dtype) || rows < 0 || columns < 0 || k < 0 ||
      k > columns || !known_index_bytes(index_bytes) ||
      (index_bytes == 2 && columns > 32768))
    return Status{1, "compress_rows", "bad arguments"};
  if (rows == 0 || k == 0) return Status{};
  return guarded("compress_rows", [&] {
    return dispatch_rows(dtype, value_dtype, index_bytes, [&](auto t, auto w, auto i) {
      compress_rows_typed(static_cast<const decltype(t)*>(x), rows, columns, k,
                          static_cast<decltype(i)*>(indices), static_cast<decltype(w)*>(values),
                          threads);
      return Status{};
    });
  });
}

Status decompress_rows(const void* indices, int index_bytes, const void* values,
                       DType value_dtype, int64_t rows, int64_t columns, int64_t k, void* out,
                       DType out_dtype, int threads) {
  if (!known_dtype(value_dtype) || !known_dtype(out_dtype) || rows < 0 || columns < 0 ||
      k < 0 || !known_index_bytes(index_bytes))
    return Status{1, "decompress_rows", "bad arguments"};
  if (rows == 0 || columns == 0) return Status{};
  return guarded("decompress_rows", [&] {
    return dispatch_rows(value_dtype, out_dtype, index_bytes, [&](auto v, auto o, auto i) {
      decompress_rows_typed(static_cast<const decltype(i)*>(indices),
                            static_cast<const decltype(v)*>(values), rows, columns, k,
                            static_cast<decltype(o)*>(out), threads);
      return Status{};
    });
  });
}

Status gather_rows(const void* y, DType dtype, int64_t rows, int64_t columns, int64_t k,
                   const void* indices, int index_bytes, void* out, int threads) {
  if (!known_dtype(dtype) || rows < 0 || columns < 0 || k < 0 ||
      !known_index_bytes(index_bytes))
    return Status{1, "gather_rows", "bad arguments"};
  if (rows == 0 || k == 0) return Status{};
  return guarded("gather_rows", [&] {
    return dispatch_float(dtype, [&](auto t) {
      using T = decltype(t);
      return dispatch_index(index_bytes, [&](auto i) {
        using I = decltype(i);
        gather_rows_typed(static_cast<const T*>(y), rows, columns, k,
                          static_cast<const I*>(indices), static_cast<T*>(out), threads);
        return Status{};
      });
    });
  });
}

}  // namespace dct_cpu
