// Exact k-th largest magnitude per segment: radix select on the magnitude keys, guided by a
// sample so that x is usually read once.
//
// Keys are split into digits: 13 + 13 + 5 bits for fp32, 13 + 2 for fp16/bf16. Level 0 is the
// top 13 bits.
//
// Sampled path (one read of x). A block per segment histograms the level-0 digits of an evenly
// spaced sample of its segment and picks a digit window [lo, hi] that holds the k-th largest
// magnitude with a wide statistical margin. One pass over x then counts, per segment, the keys
// above the window and copies the keys inside it (the "candidates", about a percent of x) to a
// pool. If for every segment count(above) < k <= count(above) + count(inside), and the pool
// held them all, every level is resolved from the candidates alone: histogram (many blocks,
// global atomics), then one block per segment picks the digit where the count from the top
// reaches k.
//
// Fallback (the sample misled: narrow ranges, adversarial data): a full radix select. Level 0
// histograms x; a second read copies the keys of the deciding buckets to the pool when they
// fit, and the last levels come from the pool; otherwise every level reads x again.
//
// Which path runs is decided on the device: every kernel is launched, and those of the path
// not taken return at once, so nothing synchronizes with the host. The result is exact either
// way, and deterministic (counts do not depend on the order of the atomics).
#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>

#include <cmath>

#include "common.cuh"
#include "digit_finder.cuh"

namespace dct {
namespace {

namespace cg = cooperative_groups;

constexpr int kDigitBits = 13;
constexpr int kMaxBins = 1 << kDigitBits;
constexpr int kHistThreads = 512;
constexpr int kResolveThreads = 512;
constexpr int kSample = 16384;                 // sampled elements per segment (at most)
constexpr int64_t kSharedHistMinItem = 16384;  // smaller chunks add to the global histogram
constexpr uint32_t kNoKey = 0xFFFFFFFFu;       // above every key (keys have at most 31 bits)
constexpr int kWindowStage = 4096;             // candidates a block stages in shared memory

struct Levels {
  int count;
  int shift[3];
  int width[3];
};

template <typename T>
Levels levels_of() {
  if (KeyTraits<T>::kBits == 31) return Levels{3, {18, 5, 0}, {13, 13, 5}};
  return Levels{2, {2, 0}, {13, 2}};
}

struct SegmentState {
  uint32_t prefix;   // key bits decided so far
  int32_t k;         // rank still to find among the keys that share the prefix
  int32_t bucket;    // how many keys share the prefix (after the last level resolved)
  int32_t lo_digit;  // sampled window of level-0 digits
  int32_t hi_digit;
  int32_t above;     // keys of the segment above the window
  int32_t inside;    // keys of the segment inside the window
  int32_t unused;
};

struct Plan {
  int32_t sampled;         // the sampled path holds: resolve from the pool
  int32_t bucket_pool;     // fallback: the deciding buckets went to the pool
  int32_t total;           // keys in the pool to resolve from
  int32_t fill;            // pool append counter
};

struct Workspace {
  int32_t* hist;  // [levels][S][kMaxBins]
  SegmentState* state;
  Plan* plan;
  uint32_t* pool_keys;  // [capacity]
  int32_t* pool_segment;
  int64_t capacity;

  // Returns the bytes to zero before a call (the pieces before the pool) with ws, else the
  // size of the whole workspace.
  static size_t layout(int S, int64_t capacity, Workspace* ws, void* base) {
    WorkspaceLayout layout(base);
    Workspace laid;
    laid.hist = layout.take<int32_t>(3 * size_t(S) * kMaxBins);
    laid.state = layout.take<SegmentState>(S);
    laid.plan = layout.take<Plan>(1);
    const size_t zeroed = layout.bytes();  // everything above starts at zero
    laid.pool_keys = layout.take<uint32_t>(capacity);
    laid.pool_segment = layout.take<int32_t>(capacity);
    laid.capacity = capacity;
    if (!ws) return layout.bytes();
    *ws = laid;
    return zeroed;
  }
};

// Appends a key to the pool: one atomic per warp for all of its lanes that append. Keys past
// the capacity are counted but not stored (the plan then rejects the pool).
__device__ __forceinline__ void pool_append(const Workspace& ws, uint32_t key, int seg) {
  cg::coalesced_group group = cg::coalesced_threads();
  int32_t first = 0;
  if (group.thread_rank() == 0) first = atomicAdd(&ws.plan->fill, int32_t(group.size()));
  const int64_t slot = int64_t(group.shfl(first, 0)) + group.thread_rank();
  if (slot < ws.capacity) {
    ws.pool_keys[slot] = key;
    ws.pool_segment[slot] = seg;
  }
}

// Calls visit(element) for x[begin, end), 16-byte loads, kUnroll of them in flight per thread.
template <typename T, int VEC, typename F>
__device__ __forceinline__ void for_each(const T* __restrict__ x, int64_t begin, int64_t end,
                                         F&& visit) {
  constexpr int kUnroll = 4;
  int64_t head_end = begin;
  if (VEC > 1) {
    const int64_t misalign = (reinterpret_cast<uintptr_t>(x + begin) / sizeof(T)) % VEC;
    head_end = min64(end, begin + (misalign ? VEC - misalign : 0));
  }
  for (int64_t i = begin + threadIdx.x; i < head_end; i += blockDim.x) visit(x[i]);
  const int64_t body = (end - head_end) / VEC;
  const Vec<T, VEC>* vx = reinterpret_cast<const Vec<T, VEC>*>(x + head_end);
  for (int64_t j = threadIdx.x; j < body; j += kUnroll * int64_t(blockDim.x)) {
    Vec<T, VEC> pack[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (j + u * blockDim.x < body) pack[u] = vx[j + u * blockDim.x];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j + u * blockDim.x < body) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) visit(pack[u].v[e]);
      }
    }
  }
  for (int64_t i = head_end + body * VEC + threadIdx.x; i < end; i += blockDim.x) visit(x[i]);
}

// ------------------------------------------------------------------------------ sampled path

// One block per segment: the level-0 digit window from an evenly spaced sample.
template <typename T>
__global__ void __launch_bounds__(kResolveThreads)
sample_kernel(const T* __restrict__ x, const int64_t* __restrict__ offsets,
              const int64_t* __restrict__ ks, Workspace ws, int shift0) {
  using Finder = DigitFinder<kResolveThreads>;
  __shared__ typename Finder::Storage finder;
  __shared__ int32_t hist[kMaxBins];
  const int seg = blockIdx.x;
  const int64_t begin = offsets[seg], length = offsets[seg + 1] - begin;
  const int m = static_cast<int>(min64(length, kSample));
  for (int i = threadIdx.x; i < kMaxBins; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  constexpr int kUnroll = 4;  // independent loads in flight per thread
  for (int j = threadIdx.x; j < m; j += kUnroll * blockDim.x) {
    uint32_t keys[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = j + u * int64_t(blockDim.x);
      keys[u] = i < m ? magnitude_key(x[begin + i * length / m]) : kNoKey;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (keys[u] != kNoKey) atomicAdd(hist + (keys[u] >> shift0), 1);
  }
  __syncthreads();
  // Expected sample rank of the k-th largest, and a margin of 4 binomial deviations + 8.
  const double rank = double(ks[seg]) * m / double(length);
  const double margin = 4.0 * sqrt(rank * (1.0 - rank / m)) + 8.0;
  const int64_t rank_hi = static_cast<int64_t>(floor(rank - margin));
  const int64_t rank_lo = static_cast<int64_t>(ceil(rank + margin));
  int32_t hi = kMaxBins - 1, lo = 0;
  if (rank_hi >= 1) {
    Finder::find(hist, kMaxBins, static_cast<int32_t>(rank_hi), finder);
    hi = finder.digit;
    __syncthreads();  // every thread has read the result before the next search resets it
  }
  if (rank_lo <= m) {
    Finder::find(hist, kMaxBins, static_cast<int32_t>(rank_lo), finder);
    lo = finder.digit;
  }
  if (threadIdx.x == 0) {
    ws.state[seg].lo_digit = lo;
    ws.state[seg].hi_digit = hi;
  }
}

// One read of x: per segment, count the keys above the window, pool the keys inside it. A
// block stages its candidates in shared memory (shared atomics, one per warp and visit), then
// reserves room in the pool with one global atomic and copies them out; candidates past the
// stage go to the pool one warp at a time.
template <typename T, int VEC>
__global__ void __launch_bounds__(kHistThreads)
window_pass_kernel(const T* __restrict__ x, const int64_t* __restrict__ items, Workspace ws,
                   int shift0) {
  using Reduce = cub::BlockReduce<int32_t, kHistThreads>;
  __shared__ typename Reduce::TempStorage reduce;
  __shared__ uint32_t stage[kWindowStage];
  __shared__ int32_t staged, base;
  const int64_t begin = items[3 * blockIdx.x], end = items[3 * blockIdx.x + 1];
  const int seg = static_cast<int>(items[3 * blockIdx.x + 2]);
  const uint32_t lo = ws.state[seg].lo_digit, hi = ws.state[seg].hi_digit;
  if (threadIdx.x == 0) staged = 0;
  __syncthreads();
  int32_t above = 0, inside = 0;
  for_each<T, VEC>(x, begin, end, [&](T v) {
    const uint32_t key = magnitude_key(v);
    const uint32_t digit = key >> shift0;
    if (digit > hi) {
      ++above;
    } else if (digit >= lo) {
      ++inside;
      cg::coalesced_group group = cg::coalesced_threads();
      int32_t first = 0;
      if (group.thread_rank() == 0) first = atomicAdd(&staged, int32_t(group.size()));
      const int32_t slot = group.shfl(first, 0) + group.thread_rank();
      if (slot < kWindowStage) stage[slot] = key;
      else pool_append(ws, key, seg);
    }
  });
  const int32_t block_above = Reduce(reduce).Sum(above);
  __syncthreads();
  const int32_t block_inside = Reduce(reduce).Sum(inside);
  const int32_t n = min(staged, kWindowStage);
  if (threadIdx.x == 0) {
    if (block_above) atomicAdd(&ws.state[seg].above, block_above);
    if (block_inside) atomicAdd(&ws.state[seg].inside, block_inside);
    base = n ? atomicAdd(&ws.plan->fill, n) : 0;
  }
  __syncthreads();
  for (int32_t j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t slot = int64_t(base) + j;
    if (slot < ws.capacity) {
      ws.pool_keys[slot] = stage[j];
      ws.pool_segment[slot] = seg;
    }
  }
}

// Does the window hold every segment's k-th largest, and did the pool hold the window?
// Sets each segment's starting rank for level 0 either way.
__global__ void __launch_bounds__(kResolveThreads)
check_kernel(Workspace ws, int num_segments, const int64_t* __restrict__ ks) {
  bool ok = ws.plan->fill <= ws.capacity;
  for (int seg = threadIdx.x; seg < num_segments; seg += blockDim.x) {
    const SegmentState st = ws.state[seg];
    const int64_t k = ks[seg];
    ok = ok && st.above < k && k <= int64_t(st.above) + st.inside;
  }
  const bool sampled = __syncthreads_and(ok);
  for (int seg = threadIdx.x; seg < num_segments; seg += blockDim.x) {
    ws.state[seg].prefix = 0;
    ws.state[seg].k = static_cast<int32_t>(ks[seg] - (sampled ? ws.state[seg].above : 0));
  }
  if (threadIdx.x == 0) {
    ws.plan->sampled = sampled;
    ws.plan->total = sampled ? ws.plan->fill : 0;
  }
}

// ---------------------------------------------------------------------------------- fallback

// Per-level behaviour of a fallback pass over x.
enum PassMode : int { kLevel0 = 0, kGatherOrHistogram = 1, kHistogramUnlessPooled = 2 };

template <typename T, int VEC>
__global__ void __launch_bounds__(kHistThreads)
pass_kernel(const T* __restrict__ x, const int64_t* __restrict__ items, Workspace ws,
            int num_segments, int mode, int level, int shift, int width) {
  __shared__ int32_t shared_hist[kMaxBins];
  if (ws.plan->sampled) return;
  bool gather = false;
  if (mode != kLevel0) {
    const bool pooled = ws.plan->bucket_pool != 0;
    if (mode == kHistogramUnlessPooled && pooled) return;
    gather = pooled;
  }
  const int64_t begin = items[3 * blockIdx.x], end = items[3 * blockIdx.x + 1];
  const int seg = static_cast<int>(items[3 * blockIdx.x + 2]);
  const uint32_t prefix = ws.state[seg].prefix;
  const int above = mode == kLevel0 ? 32 : shift + width;  // 32: every key matches
  const uint32_t mask = (1u << width) - 1u;
  const bool use_shared = !gather && (end - begin) >= kSharedHistMinItem;
  int32_t* global_hist = ws.hist + (size_t(level) * num_segments + seg) * kMaxBins;
  if (use_shared) {
    for (int i = threadIdx.x; i <= mask; i += blockDim.x) shared_hist[i] = 0;
    __syncthreads();
  }
  for_each<T, VEC>(x, begin, end, [&](T v) {
    const uint32_t key = magnitude_key(v);
    if (!shares_prefix(key, prefix, above)) return;
    if (gather) {
      pool_append(ws, key, seg);
    } else if (use_shared) {
      atomicAdd(shared_hist + ((key >> shift) & mask), 1);
    } else {
      atomicAdd(global_hist + ((key >> shift) & mask), 1);
    }
  });
  if (use_shared) {
    __syncthreads();
    for (int i = threadIdx.x; i <= mask; i += blockDim.x) {
      if (shared_hist[i]) atomicAdd(global_hist + i, shared_hist[i]);
    }
  }
}

// Fallback: do the deciding buckets of all segments fit the pool?
__global__ void __launch_bounds__(kResolveThreads)
plan_kernel(Workspace ws, int num_segments) {
  using Reduce = cub::BlockReduce<int64_t, kResolveThreads>;
  __shared__ typename Reduce::TempStorage reduce;
  if (ws.plan->sampled) return;
  int64_t sum = 0;
  for (int seg = threadIdx.x; seg < num_segments; seg += blockDim.x) sum += ws.state[seg].bucket;
  const int64_t total = Reduce(reduce).Sum(sum);
  if (threadIdx.x == 0) {
    const bool fits = total <= ws.capacity;
    ws.plan->bucket_pool = fits;
    ws.plan->total = fits ? static_cast<int32_t>(total) : 0;
    ws.plan->fill = 0;
  }
}

// --------------------------------------------------------------------------------- resolving

// Histogram of one level over the pooled keys: many blocks, global atomics (the keys are few
// and spread over many bins, so contention is low).
__global__ void __launch_bounds__(kHistThreads)
pool_hist_kernel(Workspace ws, int num_segments, int level, int shift, int width) {
  if (!ws.plan->sampled && !ws.plan->bucket_pool) return;
  const int32_t total = ws.plan->total;
  const int above = level == 0 ? 32 : shift + width;
  const uint32_t mask = (1u << width) - 1u;
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += gridDim.x * blockDim.x) {
    const int seg = ws.pool_segment[i];
    const uint32_t key = ws.pool_keys[i];
    if (shares_prefix(key, ws.state[seg].prefix, above)) {
      // Candidates crowd into few bins (level 0 spans a narrow window): lanes of a warp that
      // hit the same bin add together, one atomic per distinct bin.
      const unsigned long long bin =
          (static_cast<unsigned long long>(level) * num_segments + seg) * kMaxBins +
          ((key >> shift) & mask);
      const unsigned peers = __match_any_sync(__activemask(), bin);
      if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(ws.hist + bin, __popc(peers));
    }
  }
}

// One block per segment: the digit of this level that holds the segment's k-th largest key.
__global__ void __launch_bounds__(kResolveThreads)
resolve_kernel(Workspace ws, int num_segments, int level, int shift, int width) {
  using Finder = DigitFinder<kResolveThreads>;
  __shared__ typename Finder::Storage s;
  const int seg = blockIdx.x;
  SegmentState st = ws.state[seg];
  Finder::find(ws.hist + (size_t(level) * num_segments + seg) * kMaxBins, 1 << width, st.k, s);
  if (threadIdx.x == 0) {
    st.prefix |= static_cast<uint32_t>(s.digit) << shift;
    st.k = s.rank;
    st.bucket = s.count;
    ws.state[seg] = st;
  }
}

template <typename T>
__global__ void finalize_kernel(Workspace ws, int num_segments, T* out) {
  const int seg = blockIdx.x * blockDim.x + threadIdx.x;
  if (seg >= num_segments) return;
  // The key of a magnitude is its bit pattern (the NaN key is itself a NaN pattern).
  const uint32_t key = ws.state[seg].prefix;
  if constexpr (sizeof(T) == 4) {
    out[seg] = __uint_as_float(key);
  } else {
    out[seg] = *reinterpret_cast<const T*>(&key);  // low 16 bits, little-endian
  }
}

template <typename T>
Status run(const T* x, const int64_t* offsets, const int64_t* items, int num_items,
           const int64_t* ks, int S, int64_t pool_capacity, T* out, void* workspace,
           size_t workspace_bytes, cudaStream_t stream) {
  if (workspace_bytes < select_threshold_workspace_bytes(S, pool_capacity))
    return cuda_failure(cudaErrorInvalidValue, "select_threshold (workspace too small)");
  Workspace ws;
  const size_t zeroed = Workspace::layout(S, pool_capacity, &ws, workspace);
  DCT_CHECK("select_threshold: cudaMemsetAsync", cudaMemsetAsync(workspace, 0, zeroed, stream));
  const Levels lv = levels_of<T>();
  constexpr int VEC = 16 / sizeof(T);
  const int pool_blocks =
      static_cast<int>(min64(1024, max64(1, ceil_div(pool_capacity, kHistThreads * 8))));

  sample_kernel<T><<<S, kResolveThreads, 0, stream>>>(x, offsets, ks, ws, lv.shift[0]);
  DCT_CHECK_LAUNCH("select_threshold: sample_kernel");
  window_pass_kernel<T, VEC><<<num_items, kHistThreads, 0, stream>>>(x, items, ws, lv.shift[0]);
  DCT_CHECK_LAUNCH("select_threshold: window_pass_kernel");
  check_kernel<<<1, kResolveThreads, 0, stream>>>(ws, S, ks);
  DCT_CHECK_LAUNCH("select_threshold: check_kernel");
  for (int level = 0; level < lv.count; ++level) {
    const int shift = lv.shift[level], width = lv.width[level];
    const int mode = level == 0 ? kLevel0 : level == 1 ? kGatherOrHistogram
                                                       : kHistogramUnlessPooled;
    pass_kernel<T, VEC><<<num_items, kHistThreads, 0, stream>>>(x, items, ws, S, mode, level,
                                                                shift, width);
    DCT_CHECK_LAUNCH("select_threshold: pass_kernel");
    pool_hist_kernel<<<pool_blocks, kHistThreads, 0, stream>>>(ws, S, level, shift, width);
    DCT_CHECK_LAUNCH("select_threshold: pool_hist_kernel");
    resolve_kernel<<<S, kResolveThreads, 0, stream>>>(ws, S, level, shift, width);
    DCT_CHECK_LAUNCH("select_threshold: resolve_kernel");
    if (level == 0) {
      plan_kernel<<<1, kResolveThreads, 0, stream>>>(ws, S);
      DCT_CHECK_LAUNCH("select_threshold: plan_kernel");
    }
  }
  finalize_kernel<T><<<(S + 255) / 256, 256, 0, stream>>>(ws, S, out);
  DCT_CHECK_LAUNCH("select_threshold: finalize_kernel");
  return Status{};
}

}  // namespace

size_t select_threshold_workspace_bytes(int num_segments, int64_t candidate_capacity) {
  return Workspace::layout(num_segments, candidate_capacity, nullptr, nullptr);
}

Status select_threshold(const void* x, DType dtype, const int64_t* offsets, const int64_t* items,
                        int num_items, const int64_t* ks, int num_segments,
                        int64_t candidate_capacity, void* out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  DCT_REQUIRE(known_dtype(dtype), "select_threshold: dtype code is not 0, 1 or 2");
  if (num_items <= 0 || num_segments <= 0) return Status{};
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return run<T>(static_cast<const T*>(x), offsets, items, num_items, ks, num_segments,
                  candidate_capacity, static_cast<T*>(out), workspace, workspace_bytes, stream);
  });
}

}  // namespace dct
