// Per-row top-k (compress_rows), its inverse (decompress_rows) and gather_rows.
//
// compress_rows, per row: a 256-bin histogram of the keys' top 8 bits finds the bin that holds
// the k-th largest key; the keys of that bin (a few percent of the row for typical data, all
// of it at worst) are copied out and nth_element picks the k-th largest, kth. One more pass
// keeps every key above kth plus the first (k - count above) keys equal to it, in column
// order, so columns come out ascending. Exactly k entries per row, ties to the lower column,
// NaN above +inf. Rows are dealt to threads in groups; each row's result depends on that row
// alone.
#include <algorithm>
#include <functional>
#include <vector>

#include "common.h"

namespace dct_cpu {
namespace {

constexpr int64_t kGroupElements = 1 << 15;  // elements per task (whole rows)

int64_t rows_per_task(int64_t rows, int64_t columns) {
  return max64(1, min64(rows, kGroupElements / max64(columns, 1)));
}

template <typename T, typename W, typename I>
void compress_row(const T* row, int64_t columns, int64_t k, I* idx_out, W* val_out,
                  std::vector<uint32_t>& keys, std::vector<uint32_t>& pool) {
  constexpr int kShift = KeyTraits<T>::kBits - 8;
  keys.resize(columns);
  // Four interleaved histograms: neighbouring elements often share a bin, and one table
  // would serialize on the repeated increments.
  uint32_t hist[4][256] = {};
  int64_t c = 0;
  for (; c + 4 <= columns; c += 4) {
    for (int e = 0; e < 4; ++e) {
      keys[c + e] = magnitude_key(row[c + e]);
      ++hist[e][keys[c + e] >> kShift];
    }
  }
  for (; c < columns; ++c) {
    keys[c] = magnitude_key(row[c]);
    ++hist[0][keys[c] >> kShift];
  }
  int64_t rank = k, bin = 255;
  for (int64_t above = 0; bin >= 0; --bin) {
    const int64_t here = int64_t(hist[0][bin]) + hist[1][bin] + hist[2][bin] + hist[3][bin];
    if (above + here >= rank) {
      rank -= above;
      break;
    }
    above += here;
  }
  pool.resize(columns + 1);
  int64_t found = 0;
  for (int64_t j = 0; j < columns; ++j) {
    pool[found] = keys[j];
    found += (keys[j] >> kShift) == static_cast<uint32_t>(bin);
  }
  std::nth_element(pool.begin(), pool.begin() + (rank - 1), pool.begin() + found,
                   std::greater<uint32_t>());
  const uint32_t kth = pool[rank - 1];
  int64_t above = 0;
  for (int64_t j = 0; j < columns; ++j) above += keys[j] > kth;
  int64_t ties_left = k - above, slot = 0;
  for (int64_t j = 0; j < columns && slot < k; ++j) {
    bool keep = keys[j] > kth;
    if (keys[j] == kth && ties_left > 0) {
      keep = true;
      --ties_left;
    }
    if (keep) {
      idx_out[slot] = static_cast<I>(j);
      val_out[slot] = to_wire<W>(to_f32(row[j]));
      ++slot;
    }
  }
}

}  // namespace

Status compress_rows(const void* x, DType dtype, int64_t rows, int64_t columns, int64_t k,
                     void* indices, int index_bytes, void* values, DType value_dtype,
                     int threads) {
  if (!valid_dtype(dtype) || !valid_dtype(value_dtype) || rows < 0 || columns < 0 || k < 0 ||
      k > columns || (index_bytes != 2 && index_bytes != 4) ||
      (index_bytes == 2 && columns > 32768))
    return Status{1, "compress_rows", "bad arguments"};
  if (rows == 0 || k == 0) return Status{};
  return guarded("compress_rows", [&] {
    return dispatch_float(dtype, [&](auto t) {
      using T = decltype(t);
      return dispatch_float(value_dtype, [&](auto w) {
        using W = decltype(w);
        return dispatch_index(index_bytes, [&](auto i) {
          using I = decltype(i);
          const int64_t per = rows_per_task(rows, columns);
          parallel_for(threads, ceil_div(rows, per), [&](int64_t task) {
            std::vector<uint32_t> keys, pool;
            for (int64_t r = task * per; r < min64(rows, (task + 1) * per); ++r)
              compress_row<T, W, I>(static_cast<const T*>(x) + r * columns, columns, k,
                                    static_cast<I*>(indices) + r * k,
                                    static_cast<W*>(values) + r * k, keys, pool);
          });
          return Status{};
        });
      });
    });
  });
}

Status decompress_rows(const void* indices, int index_bytes, const void* values,
                       DType value_dtype, int64_t rows, int64_t columns, int64_t k, void* out,
                       DType out_dtype, int threads) {
  if (!valid_dtype(value_dtype) || !valid_dtype(out_dtype) || rows < 0 || columns < 0 ||
      k < 0 || (index_bytes != 2 && index_bytes != 4))
    return Status{1, "decompress_rows", "bad arguments"};
  if (rows == 0 || columns == 0) return Status{};
  return guarded("decompress_rows", [&] {
    return dispatch_float(value_dtype, [&](auto v) {
      using V = decltype(v);
      return dispatch_float(out_dtype, [&](auto o) {
        using O = decltype(o);
        return dispatch_index(index_bytes, [&](auto i) {
          using I = decltype(i);
          const int64_t per = rows_per_task(rows, columns);
          parallel_for(threads, ceil_div(rows, per), [&](int64_t task) {
            for (int64_t r = task * per; r < min64(rows, (task + 1) * per); ++r) {
              O* row = static_cast<O*>(out) + r * columns;
              std::memset(static_cast<void*>(row), 0, sizeof(O) * columns);  // +0 bits
              const I* idx = static_cast<const I*>(indices) + r * k;
              const V* val = static_cast<const V*>(values) + r * k;
              for (int64_t j = 0; j < k; ++j) {
                const int64_t col = idx[j];
                if (col >= 0 && col < columns) row[col] = from_f32<O>(to_f32(val[j]));
              }
            }
          });
          return Status{};
        });
      });
    });
  });
}

Status gather_rows(const void* y, DType dtype, int64_t rows, int64_t columns, int64_t k,
                   const void* indices, int index_bytes, void* out, int threads) {
  if (!valid_dtype(dtype) || rows < 0 || columns < 0 || k < 0 ||
      (index_bytes != 2 && index_bytes != 4))
    return Status{1, "gather_rows", "bad arguments"};
  if (rows == 0 || k == 0) return Status{};
  return guarded("gather_rows", [&] {
    return dispatch_float(dtype, [&](auto t) {
      using T = decltype(t);
      return dispatch_index(index_bytes, [&](auto i) {
        using I = decltype(i);
        const int64_t per = max64(1, min64(rows, kGroupElements / max64(k, 1)));
        parallel_for(threads, ceil_div(rows, per), [&](int64_t task) {
          for (int64_t r = task * per; r < min64(rows, (task + 1) * per); ++r) {
            const T* src = static_cast<const T*>(y) + r * columns;
            const I* idx = static_cast<const I*>(indices) + r * k;
            T* dst = static_cast<T*>(out) + r * k;
            for (int64_t j = 0; j < k; ++j) {
              const int64_t col = idx[j];
              // A bitwise copy (NaN payloads included), +0 outside the row.
              dst[j] = (col >= 0 && col < columns) ? src[col] : T{};
            }
          }
        });
        return Status{};
      });
    });
  });
}

}  // namespace dct_cpu
