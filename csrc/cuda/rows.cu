// Per-row top-k (compress_rows), its inverse (decompress_rows) and gather_rows.
//
// compress_rows: one block per row. The k-th largest key of the row is found by radix select
// over 11-bit digits (three histogram passes over the row for fp32, two for fp16/bf16; the row
// stays in L1/L2 between passes), then one more pass keeps every key above it plus the first
// (k - count above) keys equal to it in column order, writing columns ascending. Exactly k
// entries per row, ties to the lower column, NaN above +inf.
#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "digit_finder.cuh"

namespace dct {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // contiguous columns per thread in the compaction pass
constexpr int kDigitBits = 11;

template <typename T, typename W, typename I>
__global__ void __launch_bounds__(kThreads)
compress_rows_kernel(const T* __restrict__ x, int64_t columns, int32_t k, I* __restrict__ out_idx,
                     W* __restrict__ out_val) {
  using Finder = DigitFinder<kThreads>;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Finder::Storage finder;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int32_t hist[1 << kDigitBits];
  const T* row = x + blockIdx.x * columns;
  I* idx_row = out_idx + blockIdx.x * int64_t(k);
  W* val_row = out_val + blockIdx.x * int64_t(k);

  uint32_t prefix = 0;
  int32_t rank = k;
  for (int low = KeyTraits<T>::kBits; low > 0;) {
    const int width = low >= kDigitBits ? kDigitBits : low;
    const int shift = low - width;
    for (int i = threadIdx.x; i < (1 << width); i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t c = threadIdx.x; c < columns; c += kThreads) {
      const uint32_t key = magnitude_key(row[c]);
      if (shares_prefix(key, prefix, low)) atomicAdd(hist + ((key >> shift) & ((1u << width) - 1u)), 1);
    }
    __syncthreads();
    Finder::find(hist, 1 << width, rank, finder);
    prefix |= static_cast<uint32_t>(finder.digit) << shift;
    rank = finder.rank;
    low = shift;
  }
  const uint32_t kth = prefix;
  const int32_t ties_wanted = rank;  // keys equal to kth still to take, lowest columns first

  int64_t written = 0, ties_seen = 0;
  for (int64_t chunk = 0; chunk < columns; chunk += int64_t(kThreads) * kItems) {
    const int64_t first = chunk + int64_t(threadIdx.x) * kItems;
    uint32_t keys[kItems];
    unsigned above = 0, equal = 0;
    for (int e = 0; e < kItems; ++e) {
      keys[e] = first + e < columns ? magnitude_key(row[first + e]) : 0;
      const bool inside = first + e < columns;
      above += inside && keys[e] > kth;
      equal += inside && keys[e] == kth;
    }
    // Packed (equal << 32 | above) sums: one scan gives both counts before this thread.
    unsigned long long before, total;
    Scan(scan).ExclusiveSum((static_cast<unsigned long long>(equal) << 32) | above, before, total);
    __syncthreads();
    int64_t ties_before = ties_seen + static_cast<int64_t>(before >> 32);
    const int64_t ties_left = max64(0, ties_wanted - ties_seen);
    int64_t slot = written + static_cast<int64_t>(before & 0xFFFFFFFFull) +
                   min64(static_cast<int64_t>(before >> 32), ties_left);
    for (int e = 0; e < kItems; ++e) {
      if (first + e >= columns) break;
      bool keep = keys[e] > kth;
      if (keys[e] == kth) keep = ties_before++ < ties_wanted;
      if (keep) {
        idx_row[slot] = static_cast<I>(first + e);
        val_row[slot] = to_wire<W>(to_f32(row[first + e]));
        ++slot;
      }
    }
    const int64_t chunk_ties = static_cast<int64_t>(total >> 32);
    written += static_cast<int64_t>(total & 0xFFFFFFFFull) + min64(chunk_ties, ties_left);
    ties_seen += chunk_ties;
  }
}

template <typename I, typename V, typename O>
__global__ void __launch_bounds__(kThreads)
decompress_rows_kernel(const I* __restrict__ indices, const V* __restrict__ values, int64_t columns,
                       int64_t k, O* __restrict__ out) {
  O* row = out + blockIdx.x * columns;
  for (int64_t c = threadIdx.x; c < columns; c += kThreads) row[c] = from_f32<O>(0.0f);
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const int64_t col = indices[blockIdx.x * k + j];
    if (col >= 0 && col < columns) row[col] = to_out<O>(to_f32(values[blockIdx.x * k + j]));
  }
}

template <typename T, typename I>
__global__ void gather_rows_kernel(const T* __restrict__ y, int64_t rows, int64_t columns,
                                   int64_t k, const I* __restrict__ indices, T* __restrict__ out) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= rows * k) return;
  const int64_t col = indices[g];
  const int64_t r = g / k;
  out[g] = (col >= 0 && col < columns) ? y[r * columns + col] : from_f32<T>(0.0f);
}

// Calls f (returning a Status) with the index type of an index width; any width but 2 or 4
// bytes is an error, never read as int32 (the entry points reject it before this is reached).
template <typename F>
Status dispatch_index(int index_bytes, F&& f) {
  if (index_bytes == 2) return f(int16_t{});
  if (index_bytes == 4) return f(int32_t{});
  return invalid_argument("unknown index width");
}

// compress_rows and decompress_rows: f(A{}, B{}, I{}) with the element types of their two
// dtype codes and the index type of their index width.
template <typename F>
Status dispatch_rows(DType a, DType b, int index_bytes, F&& f) {
  return dispatch_float2(a, b, [&](auto ta, auto tb) {
    return dispatch_index(index_bytes, [&](auto ti) { return f(ta, tb, ti); });
  });
}

}  // namespace

Status compress_rows(const void* x, DType dtype, int64_t rows, int64_t columns, int64_t k,
                     void* indices, int index_bytes, void* values, DType value_dtype,
                     cudaStream_t stream) {
  DCT_REQUIRE(known_dtype(dtype), "compress_rows: dtype code is not 0, 1 or 2");
  DCT_REQUIRE(known_dtype(value_dtype), "compress_rows: value_dtype code is not 0, 1 or 2");
  DCT_REQUIRE(known_index_bytes(index_bytes), "compress_rows: index_bytes is not 2 or 4");
  if (rows == 0 || k == 0) return Status{};
  return dispatch_rows(dtype, value_dtype, index_bytes, [&](auto t, auto w, auto i) {
    using T = decltype(t);
    using W = decltype(w);
    using I = decltype(i);
    compress_rows_kernel<T, W, I><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), columns, static_cast<int32_t>(k), static_cast<I*>(indices),
        static_cast<W*>(values));
    DCT_CHECK_LAUNCH("compress_rows: compress_rows_kernel");
    return Status{};
  });
}

Status decompress_rows(const void* indices, int index_bytes, const void* values,
                       DType value_dtype, int64_t rows, int64_t columns, int64_t k, void* out,
                       DType out_dtype, cudaStream_t stream) {
  DCT_REQUIRE(known_index_bytes(index_bytes), "decompress_rows: index_bytes is not 2 or 4");
  DCT_REQUIRE(known_dtype(value_dtype), "decompress_rows: value_dtype code is not 0, 1 or 2");
  DCT_REQUIRE(known_dtype(out_dtype), "decompress_rows: out_dtype code is not 0, 1 or 2");
  if (rows == 0 || columns == 0) return Status{};
  return dispatch_rows(value_dtype, out_dtype, index_bytes, [&](auto v, auto o, auto i) {
    using V = decltype(v);
    using O = decltype(o);
    using I = decltype(i);
    decompress_rows_kernel<I, V, O><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const I*>(indices), static_cast<const V*>(values), columns, k,
        static_cast<O*>(out));
    DCT_CHECK_LAUNCH("decompress_rows: decompress_rows_kernel");
    return Status{};
  });
}

Status gather_rows(const void* y, DType dtype, int64_t rows, int64_t columns, int64_t k,
                   const void* indices, int index_bytes, void* out, cudaStream_t stream) {
  DCT_REQUIRE(known_dtype(dtype), "gather_rows: dtype code is not 0, 1 or 2");
  DCT_REQUIRE(known_index_bytes(index_bytes), "gather_rows: index_bytes is not 2 or 4");
  const int64_t total = rows * k;
  if (total == 0) return Status{};
  return dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_index(index_bytes, [&](auto i) {
      using I = decltype(i);
      gather_rows_kernel<T, I><<<static_cast<unsigned>(ceil_div(total, 256)), 256, 0, stream>>>(
          static_cast<const T*>(y), rows, columns, k, static_cast<const I*>(indices),
          static_cast<T*>(out));
      DCT_CHECK_LAUNCH("gather_rows: gather_rows_kernel");
      return Status{};
    });
  });
}

Status device_count(int* count) {
  DCT_CHECK("cudaGetDeviceCount", cudaGetDeviceCount(count));
  return Status{};
}

}  // namespace dct
