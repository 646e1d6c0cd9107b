// compress: threshold, index-ordered compaction into the wire buffer and the error-feedback
// residual update, in one pass over x and the residual.
//
// Each block takes a ticket (so every earlier tile has started: the look-back cannot
// deadlock), forms acc = x + residual in fp32 for its tile, marks the entries whose key
// reaches their segment's threshold key, and counts them per warp (ballots and shuffles, in
// index order). It publishes its tile's count, then learns how many entries all earlier tiles
// kept by decoupled look-back: warp 0 reads 32 predecessors' status words at a time until one
// carries an inclusive prefix. Kept entries then go straight to their slots of the wire
// buffer, the residual is rewritten from registers, and the last tile writes count and
// overflow into the header.
#include <algorithm>

#include "common.cuh"

namespace dct {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Vectors per lane and tile: without a residual a tile moves a third of the bytes, so it takes
// twice the elements to keep as many bytes in flight per look-back.
template <bool RESIDUAL>
__host__ __device__ constexpr int iters_for() { return RESIDUAL ? 4 : 8; }

// Tile status word: flag in the high half, kept count in the low half (counts < 2^31).
enum : unsigned long long { kAggregate = 1ull << 32, kPrefix = 2ull << 32 };

struct Source {
  const float* thresholds;
  const int64_t* offsets;  // nullptr: one segment
  int num_segments;
};

// Segment of element i: the last offset <= i.
__device__ __forceinline__ int segment_of(const int64_t* offsets, int num_segments, int64_t i) {
  int lo = 0, hi = num_segments - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// acc and keep bits of VEC consecutive elements starting at i (guarded against n). x and the
// residual may be the same fp32 tensor (compress(x, t, residual=x)), hence no __restrict__.
template <typename T, int VEC, bool RESIDUAL>
__device__ __forceinline__ uint32_t load_group(const T* x, const float* residual, int64_t i,
                                               int64_t n, const Source& src, uint32_t flat_key,
                                               float (&acc)[VEC]) {
  if (i + VEC <= n) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + i);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = to_f32(xv.v[e]);
    if (RESIDUAL) {
      const Vec<float, VEC> rv = load_vec<float, VEC>(residual + i);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += rv.v[e];
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      acc[e] = i + e < n ? to_f32(x[i + e]) : 0.0f;
      if (RESIDUAL && i + e < n) acc[e] += residual[i + e];
    }
  }
  uint32_t keep = 0;
  if (src.offsets == nullptr) {
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      keep |= uint32_t(i + e < n && magnitude_key(acc[e]) >= flat_key) << e;
  } else if (i < n) {
    int seg = segment_of(src.offsets, src.num_segments, i);
    int64_t seg_end = src.offsets[seg + 1];
    uint32_t tkey = threshold_key(src.thresholds[seg]);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (i + e >= n) break;
      if (i + e >= seg_end) {  // segments are never empty: at most one step per element
        ++seg;
        seg_end = src.offsets[seg + 1];
        tkey = threshold_key(src.thresholds[seg]);
      }
      keep |= uint32_t(magnitude_key(acc[e]) >= tkey) << e;
    }
  }
  return keep;
}

__device__ __forceinline__ int warp_inclusive_sum(int v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(0xFFFFFFFFu, v, d);
    if (lane >= d) v += other;
  }
  return v;
}

// Kept entries of all tiles before `tile` (warp 0 calls; every lane gets the result).
__device__ int64_t look_back(unsigned long long* status, int64_t tile, int lane) {
  int64_t exclusive = 0;
  int64_t window = tile - 1;
  unsigned delay = 16;  // ns; backing off keeps waiting tiles from flooding L2 with polls
  while (true) {
    const int64_t t = window - lane;
    unsigned long long word = t >= 0
        ? *reinterpret_cast<volatile unsigned long long*>(status + t)
        : kPrefix;  // before tile 0: an inclusive prefix of 0
    const unsigned long long flag = word & ~0xFFFFFFFFull;
    if (__any_sync(0xFFFFFFFFu, flag == 0)) {  // a predecessor has not published yet
      __nanosleep(delay);
      delay = delay < 256 ? 2 * delay : delay;
      continue;
    }
    const unsigned prefixes = __ballot_sync(0xFFFFFFFFu, flag == kPrefix);
    const int stop = prefixes ? __ffs(prefixes) - 1 : 31;
    int part = lane <= stop ? static_cast<int>(word & 0xFFFFFFFFull) : 0;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) part += __shfl_xor_sync(0xFFFFFFFFu, part, d);
    exclusive += part;
    if (prefixes) return exclusive;
    window -= 32;
  }
}

template <typename T, typename W, int VEC, bool RESIDUAL>
__global__ void __launch_bounds__(kThreads)
compress_kernel(const T* x, float* residual, int64_t n, Source src,
                int32_t* __restrict__ out_indices, W* __restrict__ out_values,
                int64_t capacity, int32_t* header, unsigned long long* status,
                unsigned int* ticket, int64_t num_tiles) {
  constexpr int kIters = iters_for<RESIDUAL>();
  constexpr int kTile = kWarps * kIters * 32 * VEC;
  __shared__ int64_t tile_s;
  __shared__ int warp_total[kWarps];
  __shared__ int64_t tile_prefix;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) tile_s = atomicAdd(ticket, 1u);
  __syncthreads();
  const int64_t tile = tile_s;
  const int64_t base = tile * kTile;
  const uint32_t flat_key = threshold_key(src.thresholds[0]);

  float acc[kIters][VEC];
  uint32_t keep[kIters];
  int lane_offset[kIters];  // kept entries before this lane's group within the warp
  int warp_count = 0;
#pragma unroll
  for (int j = 0; j < kIters; ++j) {
    const int64_t i = base + (int64_t(warp * kIters + j) * 32 + lane) * VEC;
    keep[j] = load_group<T, VEC, RESIDUAL>(x, residual, i, n, src, flat_key, acc[j]);
    const int c = __popc(keep[j]);
    const int inclusive = warp_inclusive_sum(c, lane);
    lane_offset[j] = warp_count + inclusive - c;
    warp_count += __shfl_sync(0xFFFFFFFFu, inclusive, 31);
  }
  if (lane == 0) warp_total[warp] = warp_count;
  __syncthreads();
  if (warp == 0) {
    const int mine = lane < kWarps ? warp_total[lane] : 0;
    const int tile_total = __shfl_sync(0xFFFFFFFFu, warp_inclusive_sum(mine, lane), 31);
    int64_t prefix = 0;
    if (tile == 0) {
      if (lane == 0) atomicExch(status, kPrefix | static_cast<unsigned>(tile_total));
    } else {
      if (lane == 0) atomicExch(status + tile, kAggregate | static_cast<unsigned>(tile_total));
      prefix = look_back(status, tile, lane);
      if (lane == 0)
        atomicExch(status + tile, kPrefix | static_cast<unsigned>(prefix + tile_total));
    }
    if (lane == 0) {
      tile_prefix = prefix;
      if (tile == num_tiles - 1) {
        const int64_t total = prefix + tile_total;
        const int64_t count = total < capacity ? total : capacity;
        header[wire::kWordCount] = static_cast<int32_t>(count);
        header[wire::kWordOverflow] = static_cast<int32_t>(total - count);
      }
    }
  }
  __syncthreads();
  int64_t warp_start = tile_prefix;
  for (int w = 0; w < warp; ++w) warp_start += warp_total[w];

#pragma unroll
  for (int j = 0; j < kIters; ++j) {
    const int64_t i = base + (int64_t(warp * kIters + j) * 32 + lane) * VEC;
    int64_t slot = warp_start + lane_offset[j];
    float left[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      left[e] = acc[j][e];
      if ((keep[j] >> e) & 1u) {
        if (slot < capacity) {
          const W sent = to_wire<W>(acc[j][e]);
          out_indices[slot] = static_cast<int32_t>(i + e);
          out_values[slot] = sent;
          // Sent inf/NaN leave 0 behind; finite values leave the rounding error.
          left[e] = isfinite(acc[j][e]) ? acc[j][e] - to_f32(sent) : 0.0f;
        }
        ++slot;
      }
    }
    if (RESIDUAL) {
      if (i + VEC <= n) {
        Vec<float, VEC> out;
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.v[e] = left[e];
        store_vec<float, VEC>(residual + i, out);
      } else {
        for (int e = 0; e < VEC; ++e)
          if (i + e < n) residual[i + e] = left[e];
      }
    }
  }
}

template <typename T, int VEC, bool RESIDUAL>
__global__ void count_kernel(const T* __restrict__ x, const float* __restrict__ residual,
                             int64_t n, Source src, unsigned long long* count) {
  const uint32_t flat_key = threshold_key(src.thresholds[0]);
  unsigned long long local = 0;
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * VEC; i < n;
       i += int64_t(gridDim.x) * blockDim.x * VEC) {
    float acc[VEC];
    local += __popc(load_group<T, VEC, RESIDUAL>(x, residual, i, n, src, flat_key, acc));
  }
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) local += __shfl_xor_sync(0xFFFFFFFFu, local, d);
  if ((threadIdx.x & 31) == 0 && local) atomicAdd(count, local);
}

struct Scratch {
  unsigned long long* status;
  unsigned int* ticket;
};

size_t scratch_layout(int64_t num_tiles, Scratch* s, void* base) {
  WorkspaceLayout layout(base);
  Scratch laid;
  laid.status = layout.take<unsigned long long>(num_tiles);
  laid.ticket = layout.take<unsigned int>(1);
  if (s) *s = laid;
  return layout.bytes();
}

constexpr int kMinTile = kWarps * 4 * 32;  // the smallest tile: VEC = 1, 4 iterations

template <typename T, typename W, int VEC, bool RESIDUAL>
Status launch(const CompressArgs& a, const Source& src, uint8_t* payload, int64_t capacity,
              void* workspace, cudaStream_t stream) {
  constexpr int kTile = kWarps * iters_for<RESIDUAL>() * 32 * VEC;
  const int64_t num_tiles = ceil_div(a.n, kTile);
  Scratch s;
  const size_t bytes = scratch_layout(num_tiles, &s, workspace);
  DCT_CHECK("compress: cudaMemsetAsync", cudaMemsetAsync(workspace, 0, bytes, stream));
  int32_t* header = reinterpret_cast<int32_t*>(payload);
  auto* indices = reinterpret_cast<int32_t*>(payload + wire::kHeaderBytes);
  auto* values = reinterpret_cast<W*>(payload + wire::values_offset(capacity));
  compress_kernel<T, W, VEC, RESIDUAL><<<num_tiles, kThreads, 0, stream>>>(
      static_cast<const T*>(a.x), a.residual, a.n, src, indices, values, capacity, header,
      s.status, s.ticket, num_tiles);
  DCT_CHECK_LAUNCH("compress: compress_kernel");
  return Status{};
}

template <typename T, int VEC>
Status launch_count(const CompressArgs& a, const Source& src, unsigned long long* count,
                    cudaStream_t stream) {
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(a.n, VEC * 256), 4096));
  const T* x = static_cast<const T*>(a.x);
  if (a.residual) count_kernel<T, VEC, true><<<blocks, 256, 0, stream>>>(x, a.residual, a.n, src, count);
  else count_kernel<T, VEC, false><<<blocks, 256, 0, stream>>>(x, nullptr, a.n, src, count);
  DCT_CHECK_LAUNCH("count_kept: count_kernel");
  return Status{};
}

}  // namespace

size_t compress_workspace_bytes(int64_t n) {
  return scratch_layout(ceil_div(n, kMinTile), nullptr, nullptr);
}

Status compress(const CompressArgs& a, uint8_t* payload, int64_t capacity, DType value_dtype,
                void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  DCT_REQUIRE(known_dtype(a.dtype), "compress: dtype code is not 0, 1 or 2");
  DCT_REQUIRE(known_dtype(value_dtype), "compress: value_dtype code is not 0, 1 or 2");
  if (a.n <= 0) return Status{};
  if (workspace_bytes < compress_workspace_bytes(a.n))
    return cuda_failure(cudaErrorInvalidValue, "compress (workspace too small)");
  const Source src{a.thresholds, a.offsets, a.num_segments};
  return dispatch_float2(a.dtype, value_dtype, [&](auto xtag, auto wtag) {
    using T = decltype(xtag);
    using W = decltype(wtag);
    const bool vector = aligned_to(a.x, 4 * sizeof(T)) &&
                        (a.residual == nullptr || aligned_to(a.residual, 16));
    if (a.residual) {
      return vector ? launch<T, W, 4, true>(a, src, payload, capacity, workspace, stream)
                    : launch<T, W, 1, true>(a, src, payload, capacity, workspace, stream);
    }
    return vector ? launch<T, W, 4, false>(a, src, payload, capacity, workspace, stream)
                  : launch<T, W, 1, false>(a, src, payload, capacity, workspace, stream);
  });
}

Status count_kept(const CompressArgs& a, unsigned long long* count, cudaStream_t stream) {
  DCT_REQUIRE(known_dtype(a.dtype), "count_kept: dtype code is not 0, 1 or 2");
  if (a.n <= 0) return Status{};
  const Source src{a.thresholds, a.offsets, a.num_segments};
  return dispatch_float(a.dtype, [&](auto xtag) {
    using T = decltype(xtag);
    const bool vector = aligned_to(a.x, 4 * sizeof(T)) &&
                        (a.residual == nullptr || aligned_to(a.residual, 16));
    return vector ? launch_count<T, 4>(a, src, count, stream)
                  : launch_count<T, 1>(a, src, count, stream);
  });
}

}  // namespace dct
