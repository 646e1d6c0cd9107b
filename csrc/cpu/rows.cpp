// Per-row top-k (compress_rows), its inverse (decompress_rows) and gather_rows.
//
// compress_rows, per row: one vector pass (key_scan.cpp: 16, 8 or 4 keys per compare for fp32,
// by the CPU) marks the keys at or above a guess taken from the previous row's kth, they are
// collected in column order, and kth, the k-th largest key, is found among them with a small
// histogram (kth_of_candidates); a row whose keys fall short of the guess gets one more pass at
// a lower guess, and where neither fits (the first row of a group, a row of another scale) one
// or two histogram passes over the row narrow kth down first (find_kth). Kept: every key above
// kth plus the first (k - count above) keys equal to it, so columns come out ascending; the
// result does not depend on how kth was found. Neighbouring rows tend to share a scale, so the
// guess spares most rows the histogram passes and a row's time goes into one compare pass; the
// bitmap keeps that pass and the gathering of the kept columns free of data-dependent
// branches, which matters more than the vector width (timings of each step: see
// bench/NOTES.md). Exactly k entries per row, ties to the lower column, NaN above +inf. Rows
// are dealt to threads in groups; each row's result depends on that row alone.
#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "key_scan.h"

namespace dct_cpu {
namespace {

constexpr int64_t kGroupElements = 1 << 15;  // elements per task (whole rows)

int64_t rows_per_task(int64_t rows, int64_t columns) {
  return max64(1, min64(rows, kGroupElements / max64(columns, 1)));
}

// One row's entries at or above a key, in column order.
struct Candidate {
  int64_t column;
  uint32_t key;
};

// A row's candidates in storage sized once for a whole row: adding one is a store, with no
// capacity check (a vector's push_back showed as a tenth of compress_rows' profile).
struct Pool {
  std::vector<Candidate> storage;
  std::vector<uint64_t> bits;  // keys_at_least's bitmap of a row
  std::vector<int64_t> kept;   // the kept columns of a row
  int64_t size = 0;
  uint32_t max_key = 0;  // of the keys added since clear()
  explicit Pool(int64_t columns)
      : storage(static_cast<size_t>(columns)),
        bits(static_cast<size_t>(ceil_div(columns, 64))),
        kept(static_cast<size_t>(columns)) {}
  void clear() {
    size = 0;
    max_key = 0;
  }
  void add(int64_t column, uint32_t key) {
    storage[static_cast<size_t>(size++)] = {column, key};
    max_key = key > max_key ? key : max_key;
  }
  const Candidate* begin() const { return storage.data(); }
  const Candidate* end() const { return storage.data() + size; }
};

// The bitmap of keys >= lo: the vector pass of key_scan.cpp for fp32 rows, a plain loop for the
// 16-bit formats.
inline void row_keys_at_least(const float* row, int64_t columns, uint32_t lo, uint64_t* bits) {
  keys_at_least(row, columns, lo, bits);
}
template <typename T>
void row_keys_at_least(const T* row, int64_t columns, uint32_t lo, uint64_t* bits) {
  keys_at_least_scalar(row, 0, columns, lo, bits);
}

// Fills pool with the row's entries whose key is >= lo, in column order.
template <typename T>
void collect_at_least(const T* row, int64_t columns, uint32_t lo, Pool& pool) {
  uint64_t* bits = pool.bits.data();
  row_keys_at_least(row, columns, lo, bits);
  pool.clear();
  for (int64_t w = 0; w * 64 < columns; ++w)
    for (uint64_t m = bits[w]; m; m &= m - 1) {
      const int64_t c = w * 64 + __builtin_ctzll(m);
      pool.add(c, magnitude_key(row[c]));
    }
}

// Sums four interleaved histograms from the top bin down to the bin that holds the rank-th
// largest key; returns it and lowers rank to its rank within that bin.
template <int kBins>
inline int64_t deciding_bin(const uint32_t (&hist)[4][kBins], int64_t& rank) {
  int64_t bin = kBins - 1;
  for (;; --bin) {  // the counts sum to at least rank, so this stops at bin >= 0
    const int64_t here = int64_t(hist[0][bin]) + hist[1][bin] + hist[2][bin] + hist[3][bin];
    if (here >= rank) return bin;
    rank -= here;
  }
}

// kth, the k-th largest key of a row: the top 8 bits find the bin that holds it; where that bin
// holds many keys (a quarter of a Gaussian row), a second histogram of their next (up to) 8 bits
// finds the sub-bin. The keys at or above the (sub-)bin, about k of them, are collected into
// pool in column order, and kth is selected among those that fall in the (sub-)bin.
template <typename T>
uint32_t find_kth(const T* row, int64_t columns, int64_t k, Pool& pool,
                  std::vector<uint32_t>& keys) {
  constexpr int kShift = KeyTraits<T>::kBits - 8;
  constexpr int kBits2 = kShift < 8 ? kShift : 8;
  constexpr int kShift2 = kShift - kBits2;
  constexpr uint32_t kMask2 = (1u << kBits2) - 1u;
  // Selecting among more keys than this costs more than the second histogram's pass.
  constexpr int64_t kSmallBin = 64;
  // Four interleaved histograms: neighbouring elements often share a bin, and one table would
  // serialize on the repeated increments.
  uint32_t hist[4][256] = {};
  int64_t c = 0;
  for (; c + 4 <= columns; c += 4)
    for (int e = 0; e < 4; ++e) ++hist[e][magnitude_key(row[c + e]) >> kShift];
  for (; c < columns; ++c) ++hist[0][magnitude_key(row[c]) >> kShift];
  int64_t rank = k;
  const uint32_t bin = static_cast<uint32_t>(deciding_bin(hist, rank));
  uint32_t lo = bin << kShift, hi = lo | ((1u << kShift) - 1u);
  const int64_t in_bin = int64_t(hist[0][bin]) + hist[1][bin] + hist[2][bin] + hist[3][bin];
  if (in_bin > kSmallBin) {
    // Counted without a branch: keys of other bins add 0.
    uint32_t hist2[4][1u << kBits2] = {};
    c = 0;
    for (; c + 4 <= columns; c += 4)
      for (int e = 0; e < 4; ++e) {
        const uint32_t key = magnitude_key(row[c + e]);
        hist2[e][(key >> kShift2) & kMask2] += (key >> kShift) == bin;
      }
    for (; c < columns; ++c) {
      const uint32_t key = magnitude_key(row[c]);
      hist2[0][(key >> kShift2) & kMask2] += (key >> kShift) == bin;
    }
    const uint32_t sub = static_cast<uint32_t>(deciding_bin(hist2, rank));
    lo |= sub << kShift2;
    hi = lo | ((1u << kShift2) - 1u);
  }
  collect_at_least(row, columns, lo, pool);
  if (lo == hi) return lo;
  keys.clear();
  for (const Candidate& e : pool)
    if (e.key <= hi) keys.push_back(e.key);
  std::nth_element(keys.begin(), keys.begin() + (rank - 1), keys.end(), std::greater<uint32_t>());
  return keys[rank - 1];
}

// The k-th largest key of a pool whose keys are all >= lo (k <= pool size <= 6 k), with one
// mispredicted branch or so instead of nth_element's (on random rows its data-dependent
// branches were a third of compress_rows' time, measured): a histogram of (key - lo) in at
// most 256 bins finds the bin that holds the k-th, and only that bin's few keys are selected
// among.
inline uint32_t kth_of_candidates(const Pool& pool, uint32_t lo, int64_t k,
                                  std::vector<uint32_t>& keys) {
  const uint32_t span = pool.max_key - lo;  // every key is >= lo
  const int shift = span < 256 ? 0 : 32 - __builtin_clz(span) - 8;
  uint32_t hist[256] = {};
  for (const Candidate& e : pool) ++hist[(e.key - lo) >> shift];
  // The bins are linear in the key while the candidates crowd the low end (a tail of the
  // row's distribution), so the walk starts from the end nearer the k-th: from the bottom
  // when it is among the lower half (on ReLU rows, k = 32, this walked 200-odd empty bins).
  int64_t bin, rank;
  const int64_t from_bottom = pool.size - k + 1;  // kth is the from_bottom-th smallest
  if (from_bottom <= k) {
    bin = 0;
    for (rank = from_bottom; hist[bin] < rank; ++bin) rank -= hist[bin];
    rank = hist[bin] - rank + 1;  // the same key counted from the top of its bin
  } else {
    bin = static_cast<int64_t>(span >> shift);
    for (rank = k; hist[bin] < rank; --bin) rank -= hist[bin];  // the counts reach k
  }
  if (shift == 0) return lo + static_cast<uint32_t>(bin);
  keys.resize(static_cast<size_t>(hist[bin]) + 1);
  size_t n = 0;
  for (const Candidate& e : pool) {  // the bin's keys, without a branch
    keys[n] = e.key;
    n += static_cast<size_t>(((e.key - lo) >> shift) == static_cast<uint32_t>(bin));
  }
  std::nth_element(keys.begin(), keys.begin() + (rank - 1), keys.begin() + n,
                   std::greater<uint32_t>());
  return keys[static_cast<size_t>(rank - 1)];
}

// kth from a guess (a key a little below the previous row's kth: rows of one batch tend to share
// their scale): one vector pass collects the keys at or above the guess in column order, and
// kth is selected among them. Returns how many keys reached the guess; kth is decided only when
// that is between k and 6 k (more would cost more to select than find_kth).
template <typename T>
int64_t kth_from_guess(const T* row, int64_t columns, int64_t k, uint32_t guess,
                       Pool& pool, std::vector<uint32_t>& keys, uint32_t& kth) {
  collect_at_least(row, columns, guess, pool);
  const int64_t found = pool.size;
  if (found < k || found > 6 * k) return found;
  kth = kth_of_candidates(pool, guess, k, keys);
  return found;
}

// The row keeps every key above kth and the first (k - count above) equal to it; pool holds
// every key >= kth in column order (and some below). guess carries from row to row.
//
// Rows of one batch share a scale but not a kth: on i.i.d. ReLU rows (512 columns, k = 32) the
// next row's kth falls below a guess an eighth of a binade under this one's in 10-15% of the
// rows. Such a row gets one more vector pass at a guess three eighths of a binade lower
// (about 2 k keys) before the histograms of find_kth, which then almost never run.
template <typename T, typename W, typename I>
void compress_row(const T* row, int64_t columns, int64_t k, I* idx_out, W* val_out,
                  Pool& pool, std::vector<uint32_t>& keys, uint32_t& guess) {
  // An eighth of a binade in key units (about a factor 0.92).
  constexpr uint32_t kStep = (KeyTraits<T>::kInf & ~(KeyTraits<T>::kInf << 1)) >> 3;
  uint32_t kth = 0;
  bool decided = false;
  if (guess != 0) {
    const int64_t found = kth_from_guess(row, columns, k, guess, pool, keys, kth);
    decided = found >= k && found <= 6 * k;
    if (found < k && guess > 3 * kStep) {
      const int64_t again = kth_from_guess(row, columns, k, guess - 3 * kStep, pool, keys, kth);
      decided = again >= k && again <= 6 * k;
    }
  }
  if (!decided) kth = find_kth(row, columns, k, pool, keys);
  // A wider margin selects among more keys; a narrower one misses more often (measured).
  guess = kth > kStep ? kth - kStep : 0;
  int64_t above = 0;
  for (const Candidate& e : pool) above += e.key > kth;
  // The kept columns are gathered without a branch (whether a candidate is kept is a coin flip
  // the predictor missed, measured), then written out: exactly k of them.
  int64_t ties_left = k - above, slot = 0;
  int64_t* kept = pool.kept.data();
  for (const Candidate& e : pool) {
    const bool tie = e.key == kth;
    const bool keep = (e.key > kth) | (tie & (ties_left > 0));
    ties_left -= static_cast<int64_t>(tie & keep);
    kept[slot] = e.column;  // a scratch row as wide as the pool: never out of bounds
    slot += static_cast<int64_t>(keep);
  }
  for (int64_t j = 0; j < k; ++j) {
    idx_out[j] = static_cast<I>(kept[j]);
    val_out[j] = to_wire<W>(to_f32(row[kept[j]]));
  }
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
    Pool pool(columns);
    std::vector<uint32_t> keys;
    uint32_t guess = 0;
    for (int64_t r = first; r < last; ++r)
      compress_row<T, W, I>(x + r * columns, columns, k, indices + r * k, values + r * k, pool,
                            keys, guess);
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
        if (col >= 0 && col < columns) row[col] = to_out<O>(to_f32(val[j]));
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
