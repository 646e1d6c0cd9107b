// decompress and decompress_many: device-checked scatter and the rank-ordered merge.
//
// Payloads are untrusted. Per row, the header must match the expected one (or the whole row
// is void) and the count is clamped to [0, capacity]. An entry is used only when its index
// lies in [0, numel) and is above every in-range index before it; that "running highest" is a
// max-scan over each row in three steps (per-chunk maxima, a scan over chunks, a scan within
// chunks that also counts the skipped entries). The used entries are then strictly ascending
// whatever the buffer holds, so no two write the same output and every write is in bounds.
//
// decompress_many merges over output tiles: a block owns TILE consecutive outputs in shared
// memory, stages several ranks' entries of the tile at once (their loads in flight together),
// adds rank 0's, then rank 1's, ... with a barrier between ranks, then divides, adds to out and
// rounds once. Each rank's entries of a tile are found by binary search of its running highest
// (sorted even for a corrupted row). No float atomics: the sum is 0 + d_0 + d_1 + ... in rank
// order, bitwise reproducible.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>

#include "common.cuh"

namespace dct {
namespace {

constexpr int kThreads = 256;
constexpr int kSlotsPerThread = 8;
constexpr int kChunk = kThreads * kSlotsPerThread;  // slots per block of the scans
constexpr int kTile = 4096;                          // outputs per merge block
// Staged entries per rank and tile. Each tile waits on its loads, so the more tiles an SM holds
// at once the better: on sm_90 (228 KB of shared memory per SM) 8 blocks fit with the small
// stage (24.6 KB, at most 32 registers), 5 with the large one (45 KB). The large stage keeps
// dense payloads (about 10% kept) off the slower direct path.
constexpr int kStageSmall = 128;
constexpr int kStageLarge = 448;
// The small stage is taken when the capacity spreads at most this many entries per rank over
// a tile; a tile that holds more anyway is added straight from the payload, still exactly.
constexpr int kSmallStageMaxSpread = 96;
constexpr int32_t kPastCount = INT_MAX;             // running highest of slots past the count

struct MaxOp {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const {
    return a > b ? a : b;
  }
};

struct Rows {
  PayloadRows p;
  int64_t values_offset;
  __device__ const int32_t* header(int w) const {
    return reinterpret_cast<const int32_t*>(p.buffers + w * p.row_bytes);
  }
  __device__ const int32_t* indices(int w) const { return header(w) + wire::kHeaderWords; }
};

struct Scratch {
  int32_t* count;         // [W] usable count per row (0 for a void row)
  int32_t* chunk_max;     // [W][chunks]
  int32_t* chunk_before;  // [W][chunks]
  int32_t* highest;       // [W][stride] running highest through each slot
  int64_t stride;         // capacity rounded up to 8 slots, so rows start 32-byte aligned
  int32_t* starts;        // [W][tiles + 1]
};

size_t scratch_layout(int W, int64_t capacity, int64_t numel, Scratch* s, void* base) {
  const int64_t chunks = ceil_div(capacity, kChunk);
  const int64_t tiles = ceil_div(numel, kTile);
  WorkspaceLayout layout(base);
  Scratch laid;
  laid.count = layout.take<int32_t>(W);
  laid.chunk_max = layout.take<int32_t>(size_t(W) * chunks);
  laid.chunk_before = layout.take<int32_t>(size_t(W) * chunks);
  laid.stride = (capacity + 7) / 8 * 8;
  laid.highest = layout.take<int32_t>(size_t(W) * laid.stride);
  laid.starts = layout.take<int32_t>(size_t(W) * (tiles + 1));
  if (s) *s = laid;
  return layout.bytes();
}

__global__ void header_kernel(Rows rows, Scratch s, int32_t* errors) {
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  if (w >= rows.p.num_rows) return;
  const int32_t* h = rows.header(w);
  static_assert(wire::kWordMagic == 0 && wire::kWordNumelHigh == 3,
                "expected_header holds header words 0 to 3");
  const bool header_ok = h[wire::kWordMagic] == rows.p.expected_header[wire::kWordMagic] &&
                         h[wire::kWordVersionCodes] ==
                             rows.p.expected_header[wire::kWordVersionCodes] &&
                         h[wire::kWordNumelLow] == rows.p.expected_header[wire::kWordNumelLow] &&
                         h[wire::kWordNumelHigh] == rows.p.expected_header[wire::kWordNumelHigh] &&
                         h[wire::kWordCapacity] == static_cast<int32_t>(rows.p.capacity);
  const int32_t claimed = h[wire::kWordCount];
  const bool count_ok = claimed >= 0 && claimed <= rows.p.capacity;
  int32_t count = 0;
  if (header_ok) count = static_cast<int32_t>(min64(max(claimed, 0), rows.p.capacity));
  s.count[w] = count;
  if (!header_ok || !count_ok) atomicAdd(errors, 1);
}

// The index of slot i when it is usable (below the count and in range), else -1.
__device__ __forceinline__ int32_t usable_index(const Rows& rows, const Scratch& s, int w,
                                                int64_t i, int32_t count) {
  if (i >= count) return -1;
  const int32_t idx = rows.indices(w)[i];
  return (idx >= 0 && idx < rows.p.numel) ? idx : -1;
}

__global__ void __launch_bounds__(kThreads) chunk_max_kernel(Rows rows, Scratch s,
                                                             int64_t chunks) {
  using Reduce = cub::BlockReduce<int32_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int w = blockIdx.y;
  const int32_t count = s.count[w];
  int32_t best = -1;
  for (int e = 0; e < kSlotsPerThread; ++e) {
    const int64_t i = blockIdx.x * int64_t(kChunk) + e * kThreads + threadIdx.x;
    best = max(best, usable_index(rows, s, w, i, count));
  }
  const int32_t m = Reduce(tmp).Reduce(best, MaxOp());
  if (threadIdx.x == 0) s.chunk_max[w * chunks + blockIdx.x] = m;
}

__global__ void __launch_bounds__(kThreads) chunk_scan_kernel(Scratch s, int64_t chunks) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int w = blockIdx.x;
  int32_t carried = -1;
  for (int64_t first = 0; first < chunks; first += kThreads) {
    const int64_t c = first + threadIdx.x;
    const int32_t m = c < chunks ? s.chunk_max[w * chunks + c] : -1;
    int32_t before, block_max;
    Scan(tmp).ExclusiveScan(m, before, -1, MaxOp(), block_max);
    if (c < chunks) s.chunk_before[w * chunks + c] = max(carried, before);
    carried = max(carried, block_max);
    __syncthreads();
  }
}

// Running highest through every slot, and the count of used-but-skipped entries. Each thread
// takes 8 consecutive slots, moved as two 16-byte vectors where the whole group is in range.
__global__ void __launch_bounds__(kThreads) highest_kernel(Rows rows, Scratch s, int64_t chunks,
                                                           int32_t* errors) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  using Reduce = cub::BlockReduce<int32_t, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } tmp;
  static_assert(kSlotsPerThread == 8, "two int4 per thread");
  const int w = blockIdx.y;
  const int32_t count = s.count[w];
  const int64_t first = blockIdx.x * int64_t(kChunk) + threadIdx.x * kSlotsPerThread;
  int32_t idx[kSlotsPerThread];
  const bool aligned = (reinterpret_cast<uintptr_t>(rows.indices(w)) & 15) == 0;
  if (aligned && first + kSlotsPerThread <= count) {
    const int4* src = reinterpret_cast<const int4*>(rows.indices(w) + first);
    const int4 a = src[0], b = src[1];
    const int32_t raw[kSlotsPerThread] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int e = 0; e < kSlotsPerThread; ++e)
      idx[e] = (raw[e] >= 0 && raw[e] < rows.p.numel) ? raw[e] : -1;
  } else {
#pragma unroll
    for (int e = 0; e < kSlotsPerThread; ++e) idx[e] = usable_index(rows, s, w, first + e, count);
  }
  int32_t local = -1;
#pragma unroll
  for (int e = 0; e < kSlotsPerThread; ++e) local = max(local, idx[e]);
  int32_t before;
  Scan(tmp.scan).ExclusiveScan(local, before, -1, MaxOp());
  before = max(before, s.chunk_before[w * chunks + blockIdx.x]);
  int32_t skipped = 0;
  int32_t through[kSlotsPerThread];
#pragma unroll
  for (int e = 0; e < kSlotsPerThread; ++e) {
    if (first + e < count) {
      skipped += idx[e] <= before;  // out of range (-1) or not above every earlier index
      before = max(before, idx[e]);
      through[e] = before;
    } else {
      through[e] = kPastCount;
    }
  }
  int32_t* dst = s.highest + w * s.stride + first;
  if (first + kSlotsPerThread <= s.stride) {  // the row's padding absorbs slots past capacity
    reinterpret_cast<int4*>(dst)[0] = make_int4(through[0], through[1], through[2], through[3]);
    reinterpret_cast<int4*>(dst)[1] = make_int4(through[4], through[5], through[6], through[7]);
  }
  __syncthreads();
  const int32_t total = Reduce(tmp.reduce).Sum(skipped);
  if (threadIdx.x == 0 && total) atomicAdd(errors, total);
}

// Slot i is used iff below the count, in range and above the running highest before it.
__device__ __forceinline__ bool entry_used(const Rows& rows, const Scratch& s, int w, int64_t i,
                                           int32_t idx) {
  const int32_t before = i > 0 ? s.highest[w * s.stride + i - 1] : -1;
  return i < s.count[w] && idx >= 0 && idx < rows.p.numel && idx > before;
}

template <typename V, typename O>
__global__ void scatter_kernel(Rows rows, Scratch s, O* out, bool accumulate) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= s.count[0]) return;
  const int32_t idx = rows.indices(0)[i];
  if (!entry_used(rows, s, 0, i, idx)) return;
  const V* values = reinterpret_cast<const V*>(rows.p.buffers + rows.values_offset);
  float v = to_f32(values[i]);
  if (accumulate) v = to_f32(out[idx]) + v;
  out[idx] = to_out<O>(v);
}

// starts[w][t]: the first slot of row w whose running highest reaches t * kTile.
__global__ void tile_starts_kernel(Rows rows, Scratch s, int64_t tiles) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int w = blockIdx.y;
  if (g > tiles) return;
  const int64_t target = g * kTile;
  const int32_t* h = s.highest + w * s.stride;
  int64_t lo = 0, hi = rows.p.capacity;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (h[mid] < target) lo = mid + 1; else hi = mid;
  }
  s.starts[w * (tiles + 1) + g] = static_cast<int32_t>(lo);
}

// Adds rank w's usable entries of one tile to `sum`, straight from the payload (all threads).
template <typename V>
__device__ void add_rank_direct(const Rows& rows, const Scratch& s, int w, int64_t lo, int64_t hi,
                                int64_t first, int64_t last, float* sum) {
  const int32_t* indices = rows.indices(w);
  const V* values =
      reinterpret_cast<const V*>(rows.p.buffers + w * rows.p.row_bytes + rows.values_offset);
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const int32_t idx = indices[i];
    if (idx >= first && idx < last && entry_used(rows, s, w, i, idx))
      sum[idx - first] += to_f32(values[i]);
  }
}

// One block per tile of kTile outputs. Ranks are taken kWarps at a time: each warp first
// stages one rank's entries of the tile (positions and fp32 values) in shared memory, so the
// global loads of all those ranks are in flight together; then the block adds the staged ranks
// in rank order, with a barrier between ranks. A rank with more entries in the tile than the
// stage holds is added straight from the payload in its turn.
template <typename V, typename O, int kStage, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
merge_kernel(Rows rows, Scratch s, int64_t tiles, O* out, bool accumulate, bool average) {
  constexpr int kWarps = kThreads / 32;
  __shared__ __align__(16) float sum[kTile];
  __shared__ int32_t stage_pos[kWarps][kStage];
  __shared__ float stage_val[kWarps][kStage];
  __shared__ int32_t staged[kWarps];  // entries staged per warp; -1: too many, add directly
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t first = blockIdx.x * int64_t(kTile);
  const int64_t last = min64(first + kTile, rows.p.numel);
  for (int j = threadIdx.x; j < kTile; j += kThreads) sum[j] = 0.0f;
  auto range = [&](int w, int64_t* lo, int64_t* hi) {
    *lo = s.starts[w * (tiles + 1) + blockIdx.x];
    *hi = min64(s.starts[w * (tiles + 1) + blockIdx.x + 1], s.count[w]);
  };
  for (int w0 = 0; w0 < rows.p.num_rows; w0 += kWarps) {
    const int w = w0 + warp;
    if (w < rows.p.num_rows) {
      int64_t lo, hi;
      range(w, &lo, &hi);
      const int64_t n = hi > lo ? hi - lo : 0;
      if (n <= kStage) {
        const int32_t* indices = rows.indices(w);
        const V* values = reinterpret_cast<const V*>(rows.p.buffers + w * rows.p.row_bytes +
                                                     rows.values_offset);
        for (int64_t i = lo + lane; i < hi; i += 32) {
          const int32_t idx = indices[i];
          const float v = to_f32(values[i]);
          const bool ok = idx >= first && idx < last && entry_used(rows, s, w, i, idx);
          stage_pos[warp][i - lo] = ok ? static_cast<int32_t>(idx - first) : -1;
          stage_val[warp][i - lo] = v;
        }
      }
      if (lane == 0) staged[warp] = n <= kStage ? static_cast<int32_t>(n) : -1;
    }
    __syncthreads();
    const int ranks = min64(kWarps, rows.p.num_rows - w0);
    for (int r = 0; r < ranks; ++r) {
      const int n = staged[r];
      if (n >= 0) {
        for (int j = threadIdx.x; j < n; j += kThreads) {
          const int32_t p = stage_pos[r][j];
          if (p >= 0) sum[p] += stage_val[r][j];
        }
      } else {
        int64_t lo, hi;
        range(w0 + r, &lo, &hi);
        add_rank_direct<V>(rows, s, w0 + r, lo, hi, first, last, sum);
      }
      __syncthreads();  // rank r's additions land before the next rank adds to the same outputs
    }
  }
  // x / W, correctly rounded; for a power of two W that is exactly x * (1 / W).
  const int num_rows = rows.p.num_rows;
  const float num_ranks = static_cast<float>(num_rows);
  const bool power_of_two = (num_rows & (num_rows - 1)) == 0;
  const float inverse = 1.0f / num_ranks;
  auto finish = [&](float v, O before) {
    if (average) v = power_of_two ? v * inverse : __fdiv_rn(v, num_ranks);
    if (accumulate) v = to_f32(before) + v;
    return to_out<O>(v);
  };
  // Four outputs per thread and access: with one scalar load, store and division per output
  // the kernel was bound by instruction issue, though at 1% kept nearly every output is a 0.
  constexpr int kVec = 4;
  if (last - first == kTile && aligned_to(out + first, sizeof(O) * kVec)) {
    for (int j = threadIdx.x * kVec; j < kTile; j += kThreads * kVec) {
      const float4 v = *reinterpret_cast<const float4*>(&sum[j]);
      const float r[kVec] = {v.x, v.y, v.z, v.w};
      Vec<O, kVec> before{}, result;
      if (accumulate) before = load_vec<O, kVec>(out + first + j);
#pragma unroll
      for (int e = 0; e < kVec; ++e) result.v[e] = finish(r[e], before.v[e]);
      store_vec<O, kVec>(out + first + j, result);
    }
  } else {
    for (int64_t o = first + threadIdx.x; o < last; o += kThreads)
      out[o] = finish(sum[o - first], accumulate ? out[o] : O{});
  }
}

Status check_rows(const Rows& rows, const Scratch& s, int32_t* errors, cudaStream_t stream) {
  const int W = rows.p.num_rows;
  const int64_t chunks = ceil_div(rows.p.capacity, kChunk);
  header_kernel<<<ceil_div(W, 128), 128, 0, stream>>>(rows, s, errors);
  DCT_CHECK_LAUNCH("decompress: header_kernel");
  if (chunks == 0) return Status{};
  const dim3 grid(static_cast<unsigned>(chunks), W);
  chunk_max_kernel<<<grid, kThreads, 0, stream>>>(rows, s, chunks);
  DCT_CHECK_LAUNCH("decompress: chunk_max_kernel");
  chunk_scan_kernel<<<W, kThreads, 0, stream>>>(s, chunks);
  DCT_CHECK_LAUNCH("decompress: chunk_scan_kernel");
  highest_kernel<<<grid, kThreads, 0, stream>>>(rows, s, chunks, errors);
  DCT_CHECK_LAUNCH("decompress: highest_kernel");
  return Status{};
}

Status prepare(const PayloadRows& p, void* workspace, size_t workspace_bytes, Rows* rows,
               Scratch* s) {
  if (workspace_bytes < decompress_workspace_bytes(p.num_rows, p.capacity, p.numel))
    return cuda_failure(cudaErrorInvalidValue, "decompress (workspace too small)");
  if (p.num_rows > 65535)
    return cuda_failure(cudaErrorInvalidValue, "decompress (more than 65535 rows)");
  rows->p = p;
  rows->values_offset = wire::values_offset(p.capacity);
  scratch_layout(p.num_rows, p.capacity, p.numel, s, workspace);
  return Status{};
}

size_t out_item_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

}  // namespace

size_t decompress_workspace_bytes(int num_rows, int64_t capacity, int64_t numel) {
  return scratch_layout(num_rows, capacity, numel, nullptr, nullptr);
}

Status decompress(const PayloadRows& p, void* out, DType out_dtype, bool accumulate,
                  int32_t* errors, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  DCT_REQUIRE(known_dtype(p.value_dtype), "decompress: value_dtype code is not 0, 1 or 2");
  DCT_REQUIRE(known_dtype(out_dtype), "decompress: out_dtype code is not 0, 1 or 2");
  Rows rows;
  Scratch s;
  Status st = prepare(p, workspace, workspace_bytes, &rows, &s);
  if (!st.ok()) return st;
  if (!accumulate && p.numel > 0)
    DCT_CHECK("decompress: cudaMemsetAsync",
              cudaMemsetAsync(out, 0, p.numel * out_item_bytes(out_dtype), stream));
  st = check_rows(rows, s, errors, stream);
  if (!st.ok() || p.capacity == 0) return st;
  return dispatch_float2(p.value_dtype, out_dtype, [&](auto vtag, auto otag) {
    using V = decltype(vtag);
    using O = decltype(otag);
    scatter_kernel<V, O><<<ceil_div(p.capacity, kThreads), kThreads, 0, stream>>>(
        rows, s, static_cast<O*>(out), accumulate);
    DCT_CHECK_LAUNCH("decompress: scatter_kernel");
    return Status{};
  });
}

Status decompress_many(const PayloadRows& p, void* out, DType out_dtype, bool accumulate,
                       bool average, int32_t* errors, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  DCT_REQUIRE(known_dtype(p.value_dtype), "decompress_many: value_dtype code is not 0, 1 or 2");
  DCT_REQUIRE(known_dtype(out_dtype), "decompress_many: out_dtype code is not 0, 1 or 2");
  Rows rows;
  Scratch s;
  Status st = prepare(p, workspace, workspace_bytes, &rows, &s);
  if (!st.ok()) return st;
  st = check_rows(rows, s, errors, stream);
  if (!st.ok() || p.numel == 0) return st;
  const int64_t tiles = ceil_div(p.numel, kTile);
  if (p.capacity > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(tiles + 1, kThreads)), p.num_rows);
    tile_starts_kernel<<<grid, kThreads, 0, stream>>>(rows, s, tiles);
    DCT_CHECK_LAUNCH("decompress_many: tile_starts_kernel");
  } else {
    DCT_CHECK("decompress_many: cudaMemsetAsync",
              cudaMemsetAsync(s.starts, 0, 4 * size_t(p.num_rows) * (tiles + 1), stream));
  }
  return dispatch_float2(p.value_dtype, out_dtype, [&](auto vtag, auto otag) {
    using V = decltype(vtag);
    using O = decltype(otag);
    const unsigned grid = static_cast<unsigned>(tiles);
    if (p.capacity * kTile <= kSmallStageMaxSpread * p.numel)
      merge_kernel<V, O, kStageSmall, 8><<<grid, kThreads, 0, stream>>>(
          rows, s, tiles, static_cast<O*>(out), accumulate, average);
    else
      merge_kernel<V, O, kStageLarge, 4><<<grid, kThreads, 0, stream>>>(
          rows, s, tiles, static_cast<O*>(out), accumulate, average);
    DCT_CHECK_LAUNCH("decompress_many: merge_kernel");
    return Status{};
  });
}

}  // namespace dct
