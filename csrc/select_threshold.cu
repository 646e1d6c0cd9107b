// Exact k-th largest magnitude per segment: radix select on the magnitude keys.
//
// Level 0 histograms the top 13 key bits of every element (one read of x). For each segment a
// block then finds the deciding bucket (the digit where the count from the top reaches k).
// If the deciding buckets of all segments together fit the candidate buffer, a second read of
// x copies just their keys there, and the remaining levels (13 + 5 bits for fp32, 2 bits for
// fp16/bf16) are histogrammed from those few candidates. Otherwise (narrow ranges, where most
// elements share the top bits) each remaining level reads x again. Which path runs is decided
// on the device: every kernel is launched and those of the path not taken return at once, so
// there is no host synchronization.
#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "digit_finder.cuh"

namespace dct {
namespace {

namespace cg = cooperative_groups;

constexpr int kDigitBits = 13;
constexpr int kMaxBins = 1 << kDigitBits;
constexpr int kHistThreads = 512;
constexpr int kResolveThreads = 512;
constexpr int64_t kSharedHistMinItem = 16384;  // smaller chunks add to the global histogram

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
  uint32_t prefix;  // key bits decided so far
  int32_t k;        // rank still to find among the keys that share the prefix
  int32_t bucket;   // how many keys share the prefix (after the last level resolved)
  int32_t unused;
};

struct Plan {
  int32_t use_candidates;
  int32_t total;
};

struct Workspace {
  int32_t* hist;  // [3][S][kMaxBins]
  SegmentState* state;
  int32_t* cand_offset;  // [S + 1]
  int32_t* cand_fill;    // [S]
  Plan* plan;
  uint32_t* candidates;

  static size_t layout(int S, int64_t capacity, Workspace* ws, void* base) {
    size_t off = 0;
    auto take = [&](size_t bytes) {
      size_t at = off;
      off += (bytes + 255) / 256 * 256;
      return at;
    };
    size_t hist = take(sizeof(int32_t) * 3 * size_t(S) * kMaxBins);
    size_t state = take(sizeof(SegmentState) * S);
    size_t cand_offset = take(sizeof(int32_t) * (S + 1));
    size_t cand_fill = take(sizeof(int32_t) * S);
    size_t plan = take(sizeof(Plan));
    size_t zeroed = off;  // everything above starts at zero
    size_t candidates = take(sizeof(uint32_t) * capacity);
    if (ws) {
      char* b = static_cast<char*>(base);
      ws->hist = reinterpret_cast<int32_t*>(b + hist);
      ws->state = reinterpret_cast<SegmentState*>(b + state);
      ws->cand_offset = reinterpret_cast<int32_t*>(b + cand_offset);
      ws->cand_fill = reinterpret_cast<int32_t*>(b + cand_fill);
      ws->plan = reinterpret_cast<Plan*>(b + plan);
      ws->candidates = reinterpret_cast<uint32_t*>(b + candidates);
      return zeroed;
    }
    return off;
  }
};

// Per-level behaviour of the pass over x.
enum PassMode : int { kLevel0 = 0, kGatherOrHistogram = 1, kHistogramUnlessCandidates = 2 };

template <typename T, int VEC>
__global__ void __launch_bounds__(kHistThreads)
pass_kernel(const T* __restrict__ x, const int64_t* __restrict__ items, Workspace ws,
            int num_segments, int mode, int level, int shift, int width) {
  constexpr int kUnroll = 4;  // vector loads in flight per thread
  __shared__ int32_t shared_hist[kMaxBins];
  const int64_t begin = items[3 * blockIdx.x], end = items[3 * blockIdx.x + 1];
  const int seg = static_cast<int>(items[3 * blockIdx.x + 2]);
  bool gather = false;
  if (mode != kLevel0) {
    const bool use = ws.plan->use_candidates != 0;
    if (mode == kHistogramUnlessCandidates && use) return;
    gather = use;
  }
  const uint32_t prefix = ws.state[seg].prefix;
  const int above = mode == kLevel0 ? 32 : shift + width;  // 32: every key matches
  const uint32_t mask = (1u << width) - 1u;
  const bool use_shared = !gather && (end - begin) >= kSharedHistMinItem;
  int32_t* global_hist = ws.hist + (size_t(level) * num_segments + seg) * kMaxBins;
  if (use_shared) {
    for (int i = threadIdx.x; i <= mask; i += blockDim.x) shared_hist[i] = 0;
    __syncthreads();
  }
  const int32_t cand_base = gather ? ws.cand_offset[seg] : 0;

  auto visit = [&](T v) {
    const uint32_t key = magnitude_key(v);
    if (!shares_prefix(key, prefix, above)) return;
    if (gather) {
      // One atomic per warp for all of its lanes that matched (candidates cluster).
      cg::coalesced_group group = cg::coalesced_threads();
      int32_t first = 0;
      if (group.thread_rank() == 0) first = atomicAdd(ws.cand_fill + seg, int32_t(group.size()));
      first = group.shfl(first, 0);
      ws.candidates[cand_base + first + group.thread_rank()] = key;
    } else if (use_shared) {
      atomicAdd(shared_hist + ((key >> shift) & mask), 1);
    } else {
      atomicAdd(global_hist + ((key >> shift) & mask), 1);
    }
  };

  // Scalar head up to VEC alignment, vector body, scalar tail.
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

  if (use_shared) {
    __syncthreads();
    for (int i = threadIdx.x; i <= mask; i += blockDim.x) {
      if (shared_hist[i]) atomicAdd(global_hist + i, shared_hist[i]);
    }
  }
}

__global__ void __launch_bounds__(kResolveThreads)
resolve_kernel(Workspace ws, int num_segments, const int64_t* __restrict__ ks, int level,
               int shift, int width) {
  using Finder = DigitFinder<kResolveThreads>;
  __shared__ typename Finder::Storage s;
  const int seg = blockIdx.x;
  SegmentState st;
  if (level == 0) {
    st.prefix = 0;
    st.k = static_cast<int32_t>(ks[seg]);
  } else {
    st = ws.state[seg];
  }
  Finder::find(ws.hist + (size_t(level) * num_segments + seg) * kMaxBins, 1 << width, st.k, s);
  if (threadIdx.x == 0) {
    st.prefix |= static_cast<uint32_t>(s.digit) << shift;
    st.k = s.rank;
    st.bucket = s.count;
    ws.state[seg] = st;
  }
}

// Candidate offsets of every segment (exclusive scan of the bucket sizes), and whether they
// all fit the candidate buffer.
__global__ void __launch_bounds__(kResolveThreads)
plan_kernel(Workspace ws, int num_segments, int64_t candidate_capacity) {
  using Scan = cub::BlockScan<int64_t, kResolveThreads>;
  __shared__ typename Scan::TempStorage scan;
  int64_t carried = 0;
  for (int first = 0; first < num_segments; first += kResolveThreads) {
    const int seg = first + threadIdx.x;
    const int64_t size = seg < num_segments ? ws.state[seg].bucket : 0;
    int64_t before, tile_total;
    Scan(scan).ExclusiveSum(size, before, tile_total);
    if (seg < num_segments) {
      const int64_t at = carried + before;
      ws.cand_offset[seg] = static_cast<int32_t>(min(at, candidate_capacity));
    }
    carried += tile_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const bool fits = carried <= candidate_capacity;
    ws.cand_offset[num_segments] = static_cast<int32_t>(min(carried, candidate_capacity));
    ws.plan->use_candidates = fits ? 1 : 0;
    ws.plan->total = static_cast<int32_t>(fits ? carried : 0);
  }
}

// Histogram of one level over the candidates: many blocks, global atomics (the candidates
// are few and spread over many bins, so contention is low).
__global__ void __launch_bounds__(kHistThreads)
candidate_hist_kernel(Workspace ws, int num_segments, int level, int shift, int width) {
  if (!ws.plan->use_candidates) return;
  const int32_t total = ws.plan->total;
  const int above = shift + width;
  const uint32_t mask = (1u << width) - 1u;
  int seg = -1;
  int32_t seg_end = 0;
  uint32_t prefix = 0;
  int32_t* hist = nullptr;
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += gridDim.x * blockDim.x) {
    if (seg < 0 || i >= seg_end) {  // segment of candidate i: last offset <= i
      int lo = 0, hi = num_segments - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (ws.cand_offset[mid] <= i) lo = mid; else hi = mid - 1;
      }
      seg = lo;
      seg_end = ws.cand_offset[seg + 1];
      prefix = ws.state[seg].prefix;
      hist = ws.hist + (size_t(level) * num_segments + seg) * kMaxBins;
    }
    const uint32_t key = ws.candidates[i];
    if (shares_prefix(key, prefix, above)) atomicAdd(hist + ((key >> shift) & mask), 1);
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
Status run(const T* x, const int64_t* items, int num_items, const int64_t* ks, int S,
           int64_t candidate_capacity, T* out, void* workspace, size_t workspace_bytes,
           cudaStream_t stream) {
  if (workspace_bytes < select_threshold_workspace_bytes(S, candidate_capacity))
    return Status{cudaErrorInvalidValue, "select_threshold (workspace too small)"};
  Workspace ws;
  const size_t zeroed = Workspace::layout(S, candidate_capacity, &ws, workspace);
  DCT_CHECK("select_threshold: cudaMemsetAsync", cudaMemsetAsync(workspace, 0, zeroed, stream));
  const Levels lv = levels_of<T>();
  constexpr int VEC = 16 / sizeof(T);
  // Enough blocks to spread the candidates over the chip, few enough to be cheap when idle.
  const int candidate_blocks =
      static_cast<int>(min64(512, max64(1, ceil_div(candidate_capacity, kHistThreads * 8))));
  auto pass = [&](int mode, int level) {
    pass_kernel<T, VEC><<<num_items, kHistThreads, 0, stream>>>(
        x, items, ws, S, mode, level, lv.shift[level], lv.width[level]);
  };
  pass(kLevel0, 0);
  DCT_CHECK_LAUNCH("select_threshold: histogram kernel (level 0)");
  resolve_kernel<<<S, kResolveThreads, 0, stream>>>(ws, S, ks, 0, lv.shift[0], lv.width[0]);
  DCT_CHECK_LAUNCH("select_threshold: resolve kernel (level 0)");
  plan_kernel<<<1, kResolveThreads, 0, stream>>>(ws, S, candidate_capacity);
  DCT_CHECK_LAUNCH("select_threshold: plan kernel");
  // Each later level's histogram comes from the data (narrow ranges) or from the candidates;
  // the kernel of the path not taken returns at once.
  for (int level = 1; level < lv.count; ++level) {
    pass(level == 1 ? kGatherOrHistogram : kHistogramUnlessCandidates, level);
    DCT_CHECK_LAUNCH("select_threshold: pass over x (level >= 1)");
    candidate_hist_kernel<<<candidate_blocks, kHistThreads, 0, stream>>>(
        ws, S, level, lv.shift[level], lv.width[level]);
    DCT_CHECK_LAUNCH("select_threshold: candidate histogram kernel");
    resolve_kernel<<<S, kResolveThreads, 0, stream>>>(ws, S, ks, level, lv.shift[level],
                                                      lv.width[level]);
    DCT_CHECK_LAUNCH("select_threshold: resolve kernel");
  }
  finalize_kernel<T><<<(S + 255) / 256, 256, 0, stream>>>(ws, S, out);
  DCT_CHECK_LAUNCH("select_threshold: finalize kernel");
  return Status{};
}

}  // namespace

size_t select_threshold_workspace_bytes(int num_segments, int64_t candidate_capacity) {
  return Workspace::layout(num_segments, candidate_capacity, nullptr, nullptr);
}

Status select_threshold(const void* x, DType dtype, const int64_t* items, int num_items,
                        const int64_t* ks, int num_segments, int64_t candidate_capacity,
                        void* out, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  if (num_items <= 0 || num_segments <= 0) return Status{};
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return run<T>(static_cast<const T*>(x), items, num_items, ks, num_segments,
                  candidate_capacity, static_cast<T*>(out), workspace, workspace_bytes, stream);
  });
}

}  // namespace dct
