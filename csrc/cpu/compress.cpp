// compress and count_kept: threshold, index-ordered compaction into the wire buffer and the
// error-feedback residual update.
//
// One pass over x and the residual, cut into fixed chunks that threads take in any order:
// each chunk forms acc = x + residual in fp32, writes the residual as if every kept entry of
// it were sent (acc minus the wire value; acc elsewhere), and lists its kept entries (index,
// acc). A short second step, also per chunk, places each chunk's list after the lists of the
// chunks before it: entries that land below the capacity go to the wire buffer, the others
// (overflow, rare) get all of acc back in the residual. The residual is read and written
// once, the list and the payload cost 8 bytes per kept entry each.
#include <type_traits>
#include <vector>

#include "common.h"

namespace dct_cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task
constexpr int kBlock = 16;           // elements tested together (one bit mask)

struct Kept {
  int32_t index;
  float acc;
};

// Calls f(begin, end, threshold key) for the runs of [begin, end) that lie in one segment.
template <typename F>
void for_each_run(const CompressArgs& a, int64_t begin, int64_t end, F&& f) {
  if (a.offsets == nullptr) {
    f(begin, end, threshold_key(a.thresholds[0]));
    return;
  }
  int lo = 0, hi = a.num_segments - 1;  // the segment of `begin`: last offset <= begin
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (a.offsets[mid] <= begin) lo = mid; else hi = mid - 1;
  }
  for (int s = lo; begin < end; ++s) {
    const int64_t stop = min64(end, a.offsets[s + 1]);
    if (stop > begin) f(begin, stop, threshold_key(a.thresholds[s]));
    begin = stop;
  }
}

template <typename T, bool RESIDUAL>
inline void load_acc(const T* x, const float* residual, int64_t i, int len, float* acc) {
  for (int e = 0; e < len; ++e) acc[e] = to_f32(x[i + e]);
  if (RESIDUAL)
    for (int e = 0; e < len; ++e) acc[e] += residual[i + e];
}

// The last, shorter block of a run: acc padded with zeros, the padding masked off.
template <typename T, bool RESIDUAL>
inline uint32_t partial_block_mask(const T* x, const float* residual, int64_t i, int len,
                                   uint32_t tkey, float* acc) {
  load_acc<T, RESIDUAL>(x, residual, i, len, acc);
  for (int e = len; e < kBlock; ++e) acc[e] = 0.0f;
  return keep_mask16(acc, tkey) & ((1u << len) - 1u);
}

// acc of the block at i (kBlock values, or fewer at the end of a run: the rest are padded
// and masked off) and the bit mask of its kept entries. Full blocks take fixed-length loops
// (vector code; a variable-length loop of scalar stores read back as vectors stalls on
// store forwarding).
template <typename T, bool RESIDUAL>
inline uint32_t block_mask(const T* x, const float* residual, int64_t i, int len, uint32_t tkey,
                           float* acc) {
  if (len == kBlock) {
    for (int e = 0; e < kBlock; ++e) acc[e] = to_f32(x[i + e]);
    if (RESIDUAL)
      for (int e = 0; e < kBlock; ++e) acc[e] += residual[i + e];
    return keep_mask16(acc, tkey);
  }
  return partial_block_mask<T, RESIDUAL>(x, residual, i, len, tkey, acc);
}

#if defined(__SSE2__)
template <>
inline uint32_t block_mask<float, true>(const float* x, const float* residual, int64_t i,
                                        int len, uint32_t tkey, float* acc) {
  if (len != kBlock) return partial_block_mask<float, true>(x, residual, i, len, tkey, acc);
  for (int q = 0; q < 4; ++q)
    _mm_storeu_ps(acc + 4 * q, _mm_add_ps(_mm_loadu_ps(x + i + 4 * q),
                                          _mm_loadu_ps(residual + i + 4 * q)));
  return keep_mask16(acc, tkey);
}

template <>
inline uint32_t block_mask<float, false>(const float* x, const float* residual, int64_t i,
                                         int len, uint32_t tkey, float* acc) {
  if (len != kBlock) return partial_block_mask<float, false>(x, residual, i, len, tkey, acc);
  // Without a residual acc is x itself: test it in place; acc is filled only when needed.
  const uint32_t mask = keep_mask16(x + i, tkey);
  if (mask) std::memcpy(acc, x + i, sizeof(float) * kBlock);
  return mask;
}
#endif

// Kept entries among 16 fp32 values, added to a vector of four counts (as negative numbers:
// a true compare is -1).
inline void count16(const float* acc, uint32_t tkey, int64_t* total) {
#if defined(__SSE2__)
  const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF), inf = _mm_set1_epi32(0x7F800000);
  const __m128i below = _mm_set1_epi32(static_cast<int32_t>(tkey) - 1);
  __m128i sum = _mm_setzero_si128();
  for (int q = 0; q < 4; ++q) {
    __m128i key = _mm_and_si128(_mm_castps_si128(_mm_loadu_ps(acc + 4 * q)), abs_mask);
    key = _mm_or_si128(key, _mm_and_si128(_mm_cmpgt_epi32(key, inf), abs_mask));
    sum = _mm_sub_epi32(sum, _mm_cmpgt_epi32(key, below));
  }
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4E));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xB1));
  *total += _mm_cvtsi128_si32(sum);
#else
  for (int j = 0; j < 16; ++j) *total += magnitude_key(acc[j]) >= tkey;
#endif
}

template <typename T, bool RESIDUAL>
int64_t count_range(const CompressArgs& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.x);
  int64_t total = 0;
  for_each_run(a, begin, end, [&](int64_t b, int64_t e, uint32_t tkey) {
    float acc[kBlock];
    int64_t i = b;
    for (; i + kBlock <= e; i += kBlock) {
      if (std::is_same<T, float>::value && !RESIDUAL) {
        count16(reinterpret_cast<const float*>(x) + i, tkey, &total);
        continue;
      }
      load_acc<T, RESIDUAL>(x, a.residual, i, kBlock, acc);
      count16(acc, tkey, &total);
    }
    if (i < e) {
      const int len = static_cast<int>(e - i);
      load_acc<T, RESIDUAL>(x, a.residual, i, len, acc);
      for (int j = 0; j < len; ++j) total += magnitude_key(acc[j]) >= tkey;
    }
  });
  return total;
}

// Lists the chunk's kept entries, at most `limit` of them (no chunk can place more than the
// capacity in the payload); the ones past the limit are only counted in *unlisted and keep
// all of acc in the residual. The residual is written for the whole range.
template <typename T, typename W, bool RESIDUAL>
void compress_range(const CompressArgs& a, int64_t begin, int64_t end, int64_t limit,
                    std::vector<Kept>* kept, int64_t* unlisted) {
  const T* x = static_cast<const T*>(a.x);
  float* residual = a.residual;
  int64_t room = limit;
  for_each_run(a, begin, end, [&](int64_t b, int64_t e, uint32_t tkey) {
    float acc[kBlock];
    for (int64_t i = b; i < e; i += kBlock) {
      const int len = static_cast<int>(min64(kBlock, e - i));
      uint32_t mask = block_mask<T, RESIDUAL>(x, residual, i, len, tkey, acc);
      if (RESIDUAL) {
        if (len == kBlock) {  // fixed length: vector stores (a memcpy call here costs more)
          for (int j = 0; j < kBlock; ++j) residual[i + j] = acc[j];
        } else {
          for (int j = 0; j < len; ++j) residual[i + j] = acc[j];
        }
      }
      // Lists the lowest entry left in mask. Sent inf/NaN leave 0 behind; finite values leave
      // the rounding error. An entry that turns out not to fit gets all of acc back in the
      // second step.
      auto list_lowest = [&] {
        const int j = __builtin_ctz(mask);
        mask &= mask - 1;
        kept->push_back(Kept{static_cast<int32_t>(i + j), acc[j]});
        --room;
        if (RESIDUAL)
          residual[i + j] = is_finite(acc[j]) ? acc[j] - to_f32(to_wire<W>(acc[j])) : 0.0f;
      };
      if (mask && room < 16) {  // near the limit: list what fits, count the rest
        while (room > 0 && mask) list_lowest();
        *unlisted += __builtin_popcount(mask);
        continue;
      }
      while (mask) list_lowest();
    }
  });
}

template <typename T, typename W>
Status compress_typed(const CompressArgs& a, uint8_t* payload, int64_t capacity, int threads) {
  const int64_t tasks = ceil_div(a.n, kChunk);
  std::vector<std::vector<Kept>> kept(tasks);
  std::vector<int64_t> unlisted(tasks, 0);
  parallel_for(threads, tasks, [&](int64_t t) {
    const int64_t begin = t * kChunk, end = min64(a.n, begin + kChunk);
    if (a.residual) compress_range<T, W, true>(a, begin, end, capacity, &kept[t], &unlisted[t]);
    else compress_range<T, W, false>(a, begin, end, capacity, &kept[t], &unlisted[t]);
  });
  // A chunk's unlisted entries come after its listed ones, and the listed ones already reach
  // the capacity on their own: none of them is sent.
  std::vector<int64_t> start(tasks + 1, 0);
  for (int64_t t = 0; t < tasks; ++t)
    start[t + 1] = start[t] + static_cast<int64_t>(kept[t].size()) + unlisted[t];
  const int64_t total = start[tasks];
  const int64_t count = min64(total, capacity);
  uint8_t* indices = payload + dct::wire::kHeaderBytes;
  uint8_t* values = payload + dct::wire::values_offset(capacity);
  auto place = [&](int64_t t) {
    const std::vector<Kept>& list = kept[t];
    for (size_t j = 0; j < list.size(); ++j) {
      const int64_t slot = start[t] + static_cast<int64_t>(j);
      if (slot < capacity) {
        store<int32_t>(indices + dct::wire::kIndexBytes * slot, list[j].index);
        store<W>(values + sizeof(W) * slot, to_wire<W>(list[j].acc));
      } else if (a.residual) {
        a.residual[list[j].index] = list[j].acc;
      }
    }
  };
  // Placing is a few bytes per kept entry: threads only when there is much of it.
  if (total >= (1 << 16)) parallel_for(threads, tasks, place);
  else for (int64_t t = 0; t < tasks; ++t) place(t);
  store<int32_t>(payload + 4 * dct::wire::kWordCount, static_cast<int32_t>(count));
  store<int32_t>(payload + 4 * dct::wire::kWordOverflow, static_cast<int32_t>(total - count));
  return Status{};
}

bool valid_args(const CompressArgs& a) {
  return known_dtype(a.dtype) && a.n >= 0 && a.n < (int64_t(1) << 31) && a.thresholds &&
         a.num_segments >= 1 && (a.offsets == nullptr || a.offsets[a.num_segments] == a.n);
}

}  // namespace

Status count_kept(const CompressArgs& a, int64_t* count, int threads) {
  if (!valid_args(a)) return Status{1, "count_kept", "bad arguments"};
  return guarded("count_kept", [&] {
    return dispatch_float(a.dtype, [&](auto tag) {
      using T = decltype(tag);
      const int64_t tasks = ceil_div(a.n, kChunk);
      std::vector<int64_t> counts(tasks, 0);
      parallel_for(threads, tasks, [&](int64_t t) {
        const int64_t begin = t * kChunk, end = min64(a.n, begin + kChunk);
        counts[t] = a.residual ? count_range<T, true>(a, begin, end)
                               : count_range<T, false>(a, begin, end);
      });
      int64_t total = 0;
      for (int64_t c : counts) total += c;
      *count = total;
      return Status{};
    });
  });
}

Status compress(const CompressArgs& a, uint8_t* payload, int64_t capacity, DType value_dtype,
                int threads) {
  if (!valid_args(a) || !known_dtype(value_dtype) || capacity < 0 ||
      capacity >= (int64_t(1) << 31))
    return Status{1, "compress", "bad arguments"};
  if (a.n == 0) return Status{};
  return guarded("compress", [&] {
    return dispatch_float2(a.dtype, value_dtype, [&](auto xtag, auto wtag) {
      return compress_typed<decltype(xtag), decltype(wtag)>(a, payload, capacity, threads);
    });
  });
}

Status compress_ranges(const CompressArgs& whole, const int64_t* cuts, int num_ranges,
                       const int64_t* offsets, const int64_t* offset_starts,
                       const int32_t* header, uint8_t* rows, int64_t row_bytes,
                       int64_t capacity, DType value_dtype, const RangesV2* v2, int threads) {
  using namespace dct::wire;
  const int64_t value_bytes = v2 ? value_width(v2->wire.value_code) : item_bytes(value_dtype);
  const int64_t needed = v2 ? v2->wire.values_offset + value_bytes * capacity
                            : buffer_bytes(capacity, value_bytes);
  const bool ok = known_dtype(whole.dtype) && whole.n >= 0 && whole.thresholds &&
                  num_ranges >= 1 && capacity >= 0 && cuts[0] == 0 &&
                  cuts[num_ranges] == whole.n && row_bytes >= needed &&
                  (v2 ? known_dtype(v2->candidate_dtype) && v2->wire.capacity == capacity &&
                            (v2->wire.num_scales == 0 || v2->scale_offsets)
                      : known_dtype(value_dtype));
  if (!ok) return Status{1, "compress_ranges", "bad arguments"};
  for (int s = 0; s < num_ranges; ++s)
    if (cuts[s + 1] < cuts[s] || offset_starts[s + 1] < offset_starts[s] + 2)
      return Status{1, "compress_ranges", "bad arguments"};
  const int64_t element = item_bytes(whole.dtype);
  // Version 2: the candidates of one range at a time, as a version-1 payload.
  std::vector<uint8_t> scratch;
  if (v2)
    scratch.resize(static_cast<size_t>(
        buffer_bytes(capacity, item_bytes(v2->candidate_dtype))));
  const float* thresholds = whole.thresholds;
  for (int s = 0; s < num_ranges; ++s) {
    const int64_t lo = cuts[s], n = cuts[s + 1] - lo;
    uint8_t* row = rows + s * row_bytes;
    // The row as compress() finds it from ops.compress: zeroed, the header written, numel the
    // range's length (an empty range stays an empty payload of numel 0).
    std::memset(row, 0, static_cast<size_t>(row_bytes));
    int32_t words[kHeaderWords];
    std::memcpy(words, header, sizeof(words));
    words[kWordNumelLow] = static_cast<int32_t>(static_cast<uint32_t>(n));
    words[kWordNumelHigh] = static_cast<int32_t>(n >> 32);
    std::memcpy(row, words, sizeof(words));
    const int64_t num_scales = v2 ? v2->wire.num_scales : 0;
    const int64_t* scales = num_scales ? v2->scale_offsets + s * (num_scales + 1) : nullptr;
    if (n == 0) {  // an empty range takes no threshold; an empty fp8 payload still decodes
      for (int64_t j = 0; j < num_scales; ++j) {
        store<float>(row + v2->wire.scales_offset + 4 * j, 1.0f);
        store<int32_t>(row + v2->wire.bounds_offset + 4 * j, static_cast<int32_t>(scales[j]));
      }
      if (num_scales)
        store<int32_t>(row + v2->wire.bounds_offset + 4 * num_scales,
                       static_cast<int32_t>(scales[num_scales]));
      continue;
    }
    CompressArgs a;
    a.x = static_cast<const uint8_t*>(whole.x) + lo * element;
    a.dtype = whole.dtype;
    a.n = n;
    a.residual = whole.residual ? whole.residual + lo : nullptr;
    a.thresholds = thresholds;
    a.offsets = offsets + offset_starts[s];
    a.num_segments = static_cast<int>(offset_starts[s + 1] - offset_starts[s] - 1);
    if (a.offsets[0] != 0) return Status{1, "compress_ranges", "bad arguments"};
    thresholds += a.num_segments;
    if (!v2) {
      const Status status = compress(a, row, capacity, value_dtype, threads);
      if (status.code) return status;
      continue;
    }
    uint8_t* cand = scratch.data();
    std::memset(cand, 0, scratch.size());
    Status status = compress(a, cand, capacity, v2->candidate_dtype, threads);
    if (status.code) return status;
    status = encode_v2(v2->wire, row, reinterpret_cast<const int32_t*>(cand + kHeaderBytes),
                       cand + values_offset(capacity), static_cast<int>(v2->candidate_dtype),
                       load<int32_t>(cand + 4 * kWordCount),
                       load<int32_t>(cand + 4 * kWordOverflow), 0, scales, a.residual);
    if (status.code) return status;
  }
  return Status{};
}

}  // namespace dct_cpu
