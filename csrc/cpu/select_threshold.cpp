// Exact k-th largest magnitude per segment, without a full sort.
//
// Small segments (up to kSmallSegment elements): the keys are copied and nth_element picks
// the k-th. Larger ones:
//   * fp16/bf16: keys have 15 bits, so one histogram pass over all 2^15 keys decides it.
//   * fp32, sampled path (usually one read of x): an evenly spaced sample of the segment gives
//     a key window that holds the k-th largest with a wide statistical margin; one pass counts
//     the keys above the window and copies those inside it (about a percent of x) to
//     candidate lists, and if count(above) < k <= count(above) + count(inside) the answer is
//     the (k - above)-th largest candidate.
//   * fp32 fallback (the sample misled: narrow ranges, adversarial data, or the window held
//     too many keys): radix select over a 16-bit and a 15-bit digit, two reads of x.
// Counts are integers and a k-th largest is one value whichever way it is found, so the
// result does not depend on how the work was split between threads.
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "common.h"

namespace dct_cpu {
namespace {

constexpr int64_t kSmallSegment = 1 << 15;
constexpr int64_t kPassChunk = 1 << 16;   // elements per task of the window pass
constexpr int64_t kMinPerThread = 1 << 16;  // below this a histogram pass stays on one thread
constexpr int64_t kWindowStep = 4096;       // keys per window_pass call (they stay in L1)

uint32_t kth_of_keys(std::vector<uint32_t>& keys, int64_t k) {
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint32_t>());
  return keys[k - 1];
}

template <typename T>
uint32_t select_small(const T* x, int64_t n, int64_t k, std::vector<uint32_t>& keys) {
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = magnitude_key(x[i]);
  return kth_of_keys(keys, k);
}

// The digit d of a histogram with count(digits > d) < k <= count(digits >= d); *k becomes
// the rank of the answer among the keys of digit d.
uint32_t find_digit(const std::vector<int64_t>& hist, int64_t* k) {
  int64_t above = 0;
  for (int64_t d = static_cast<int64_t>(hist.size()) - 1; d >= 0; --d) {
    if (above + hist[d] >= *k) {
      *k -= above;
      return static_cast<uint32_t>(d);
    }
    above += hist[d];
  }
  return 0;  // unreachable for 1 <= k <= n
}

// Histogram of (key >> shift) & (bins - 1) over the keys whose bits above `prefix_shift`
// equal `prefix` (all keys when prefix_shift >= 32), split over threads.
template <typename T>
std::vector<int64_t> histogram(const T* x, int64_t n, int bins, int shift, int prefix_shift,
                               uint32_t prefix, int threads) {
  const int64_t tasks = max64(1, min64(threads, n / kMinPerThread));
  std::vector<std::vector<uint32_t>> parts(tasks);
  parallel_for(threads, tasks, [&](int64_t t) {
    std::vector<uint32_t>& h = parts[t];
    h.assign(bins, 0);
    const int64_t begin = n * t / tasks, end = n * (t + 1) / tasks;
    const uint32_t mask = static_cast<uint32_t>(bins - 1);
    // Counts are 32-bit per task: a task sees fewer than 2^31 elements (numel < 2^31).
    if (prefix_shift >= 32) {
      for (int64_t i = begin; i < end; ++i) ++h[(magnitude_key(x[i]) >> shift) & mask];
    } else {
      for (int64_t i = begin; i < end; ++i) {
        const uint32_t key = magnitude_key(x[i]);
        if ((key >> prefix_shift) == prefix) ++h[(key >> shift) & mask];
      }
    }
  });
  std::vector<int64_t> total(bins, 0);
  for (const auto& h : parts)
    for (int b = 0; b < bins; ++b) total[b] += h[b];
  return total;
}

template <typename T>
uint32_t select_radix(const T* x, int64_t n, int64_t k, int threads) {
  if (KeyTraits<T>::kBits == 15) {
    const std::vector<int64_t> hist = histogram(x, n, 1 << 15, 0, 32, 0, threads);
    return find_digit(hist, &k);
  }
  const std::vector<int64_t> high = histogram(x, n, 1 << 16, 15, 32, 0, threads);
  const uint32_t top = find_digit(high, &k);
  const std::vector<int64_t> low = histogram(x, n, 1 << 15, 0, 15, top, threads);
  return (top << 15) | find_digit(low, &k);
}

// Over x[begin, end): counts the keys above hi into *over and appends the keys in [lo, hi]
// to out at *count (out has room for end - begin more).
void window_pass(const float* x, int64_t begin, int64_t end, uint32_t lo, uint32_t hi,
                 uint32_t* out, int64_t* count, int64_t* over) {
  const uint32_t width = hi - lo;
  int64_t i = begin, n_out = *count, n_over = 0;
#if defined(__SSE2__)
  // Unsigned compares as signed ones on keys with the top bit flipped. The raw |x| bits of a
  // NaN (above +inf's) stand for the NaN key unless the window reaches into the NaN bit
  // patterns without covering them all: only then are NaN keys formed exactly.
  const bool exact_nan = hi > 0x7F800000u && lo > 0x7F800001u;
  const __m128i flip = _mm_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF), inf = _mm_set1_epi32(0x7F800000);
  const __m128i hi_f = _mm_set1_epi32(static_cast<int32_t>(hi ^ 0x80000000u));
  const __m128i lo_v = _mm_set1_epi32(static_cast<int32_t>(lo));
  const __m128i width_f = _mm_set1_epi32(static_cast<int32_t>(width ^ 0x80000000u));
  __m128i above = _mm_setzero_si128();
  auto keys = [=](int64_t at) {
    __m128i key = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + at)),
                                abs_mask);
    if (exact_nan) key = _mm_or_si128(key, _mm_and_si128(_mm_cmpgt_epi32(key, inf), abs_mask));
    return key;
  };
  auto outside = [=](__m128i key) {
    return _mm_cmpgt_epi32(_mm_xor_si128(_mm_sub_epi32(key, lo_v), flip), width_f);
  };
  // Two steps per piece of at most kPiece keys (it stays in L1): a branch-free vector pass
  // counts the keys above the window and notes which groups of 16 hold a key inside it; then
  // only those groups are visited. (Appending while streaming mispredicts on every group
  // that holds a candidate, and each misprediction also discards the loads in flight: the
  // pass then ran at a third of the speed of a plain read.)
  constexpr int64_t kPiece = kWindowStep;
  uint16_t groups[kPiece / 16];
  while (i + 16 <= end) {
    const int64_t piece_end = i + min64(kPiece, (end - i) / 16 * 16);
    int g = 0;
    for (int64_t at = i; at < piece_end; at += 16, ++g) {
      const __m128i k0 = keys(at), k1 = keys(at + 4), k2 = keys(at + 8), k3 = keys(at + 12);
      above = _mm_sub_epi32(above, _mm_cmpgt_epi32(_mm_xor_si128(k0, flip), hi_f));
      above = _mm_sub_epi32(above, _mm_cmpgt_epi32(_mm_xor_si128(k1, flip), hi_f));
      above = _mm_sub_epi32(above, _mm_cmpgt_epi32(_mm_xor_si128(k2, flip), hi_f));
      above = _mm_sub_epi32(above, _mm_cmpgt_epi32(_mm_xor_si128(k3, flip), hi_f));
      const int out_mask =
          _mm_movemask_ps(_mm_castsi128_ps(outside(k0))) |
          (_mm_movemask_ps(_mm_castsi128_ps(outside(k1))) << 4) |
          (_mm_movemask_ps(_mm_castsi128_ps(outside(k2))) << 8) |
          (_mm_movemask_ps(_mm_castsi128_ps(outside(k3))) << 12);
      groups[g] = static_cast<uint16_t>(~out_mask);
    }
    for (int j = 0; j < g; ++j) {
      for (uint32_t inside = groups[j]; inside; inside &= inside - 1)
        out[n_out++] = magnitude_key(x[i + 16 * j + __builtin_ctz(inside)]);
    }
    i = piece_end;
  }
  int32_t lanes[4];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes), above);
  n_over += int64_t(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
#endif
  for (; i < end; ++i) {
    const uint32_t key = magnitude_key(x[i]);
    n_over += key > hi;
    out[n_out] = key;  // kept only when inside: branch-free append
    n_out += (key - lo) <= width;
  }
  *count = n_out;
  *over += n_over;
}

// The sampled path for fp32; false when it cannot decide (then the radix select runs).
bool select_sampled(const float* x, int64_t n, int64_t k, int threads, uint32_t* result) {
  const int64_t m = min64(n / 4, max64(16384, n >> 8));
  std::vector<uint32_t> sample(m);
  for (int64_t j = 0; j < m; ++j) sample[j] = magnitude_key(x[j * n / m + (n / m) / 2]);
  // The k-th largest of x sits near rank k m / n of the sample; the window spans six
  // standard deviations of that rank (binomial) on either side, plus a constant.
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const double centre = p * static_cast<double>(m);
  const double margin = 6.0 * std::sqrt(static_cast<double>(m) * p * (1.0 - p)) + 16.0;
  const int64_t first = max64(1, static_cast<int64_t>(std::floor(centre - margin)));
  const int64_t last = min64(m, static_cast<int64_t>(std::ceil(centre + margin)));
  uint32_t hi = 0xFFFFFFFFu, lo = 0;
  if (first > 1) {  // the window's top: the sample's first-th largest key
    std::nth_element(sample.begin(), sample.begin() + (first - 1), sample.end(),
                     std::greater<uint32_t>());
    hi = sample[first - 1];
  }
  if (last < m) {
    std::nth_element(sample.begin(), sample.begin() + (last - 1), sample.end(),
                     std::greater<uint32_t>());
    lo = sample[last - 1];
  }
  // Room for four times the expected share of the window in each task, plus slack.
  const double share = static_cast<double>(last - first + 1) / static_cast<double>(m);
  const int64_t tasks = ceil_div(n, kPassChunk);
  std::vector<std::vector<uint32_t>> found(tasks);
  std::vector<int64_t> above(tasks, 0);
  std::vector<char> full(tasks, 0);
  parallel_for(threads, tasks, [&](int64_t t) {
    const int64_t begin = t * kPassChunk, end = min64(n, begin + kPassChunk);
    const int64_t room = static_cast<int64_t>(4.0 * share * (end - begin)) + 1024;
    std::vector<uint32_t>& out = found[t];
    out.resize(room + kWindowStep);
    int64_t count = 0, over = 0;
    for (int64_t i = begin; i < end; i += kWindowStep) {
      if (count > room) {  // the window holds far more than the sample said
        full[t] = 1;
        return;
      }
      window_pass(x, i, min64(end, i + kWindowStep), lo, hi, out.data(), &count, &over);
    }
    out.resize(count);
    above[t] = over;
  });
  int64_t total_above = 0, inside = 0;
  for (int64_t t = 0; t < tasks; ++t) {
    if (full[t]) return false;
    total_above += above[t];
    inside += static_cast<int64_t>(found[t].size());
  }
  if (!(total_above < k && k <= total_above + inside)) return false;
  std::vector<uint32_t> candidates;
  candidates.reserve(inside);
  for (const auto& f : found) candidates.insert(candidates.end(), f.begin(), f.end());
  *result = kth_of_keys(candidates, k - total_above);
  return true;
}

template <typename T>
uint32_t select_large(const T* x, int64_t n, int64_t k, int threads) {
  uint32_t key = 0;
  if (KeyTraits<T>::kBits == 31 &&
      select_sampled(reinterpret_cast<const float*>(x), n, k, threads, &key))
    return key;
  return select_radix(x, n, k, threads);
}

template <typename T>
void store_key(void* out, int s, uint32_t key) {
  if (KeyTraits<T>::kBits == 31) static_cast<uint32_t*>(out)[s] = key;
  else static_cast<uint16_t*>(out)[s] = static_cast<uint16_t>(key);
}

}  // namespace

Status select_threshold(const void* x, DType dtype, const int64_t* offsets, const int64_t* ks,
                        int num_segments, void* out, int threads) {
  if (!known_dtype(dtype)) return Status{1, "select_threshold", "unknown dtype code"};
  for (int s = 0; s < num_segments; ++s) {
    const int64_t len = offsets[s + 1] - offsets[s];
    if (len <= 0 || ks[s] < 1 || ks[s] > len)
      return Status{1, "select_threshold", "bad segment offsets or k"};
  }
  return guarded("select_threshold", [&] {
    return dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* data = static_cast<const T*>(x);
      // Small segments, a group of consecutive ones per task; then the large ones, each
      // spread over the threads.
      std::vector<int> small, large;
      for (int s = 0; s < num_segments; ++s)
        (offsets[s + 1] - offsets[s] <= kSmallSegment ? small : large).push_back(s);
      constexpr int64_t kGroupElements = 1 << 16;
      std::vector<int64_t> group_start{0};
      int64_t filled = 0;
      for (size_t j = 0; j < small.size(); ++j) {
        filled += offsets[small[j] + 1] - offsets[small[j]];
        if (filled >= kGroupElements && j + 1 < small.size()) {
          group_start.push_back(static_cast<int64_t>(j + 1));
          filled = 0;
        }
      }
      group_start.push_back(static_cast<int64_t>(small.size()));
      const int64_t groups = small.empty() ? 0 : static_cast<int64_t>(group_start.size()) - 1;
      parallel_for(threads, groups, [&](int64_t g) {
        std::vector<uint32_t> keys;
        for (int64_t j = group_start[g]; j < group_start[g + 1]; ++j) {
          const int s = small[j];
          store_key<T>(out, s, select_small(data + offsets[s], offsets[s + 1] - offsets[s],
                                            ks[s], keys));
        }
      });
      for (int s : large)
        store_key<T>(out, s, select_large(data + offsets[s], offsets[s + 1] - offsets[s],
                                          ks[s], threads));
      return Status{};
    });
  });
}

}  // namespace dct_cpu
