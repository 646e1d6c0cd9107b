// The threshold rule of the DDP hook between exact refreshes (docs/design.md, "Refresh and
// band"), fused: dct_kernels/distributed/threshold_rule.py composes the same two steps from
// ~10 and ~30 small torch operations, which on the host cost more than the arithmetic (a few
// microseconds each, per bucket and step). Here each is one call, O(sample) and
// O(parameters + kept entries), bitwise the composition's result: the same fp32 operations
// in the same order, comparisons made exactly (float64 of integers, int64 fixed-point sums).
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "common.h"

namespace dct_cpu {
namespace {

constexpr float kFloor = 1.40129846e-45f;  // 2^-149, the smallest positive fp32

// The count average's fixed point for the band's sums: exact and order-free in int64.
constexpr double kFixed = 16777216.0;  // 2^24

// The sample's order statistic is small (k_s <= 64 by the stride's definition: about 32, or
// a whole piece's k below 64), so it is found in one pass with a min-heap of the k largest
// keys seen: most keys lose one comparison against its top (nth_element over a copy of the
// keys made several passes and cost twice as much).
template <typename T>
uint32_t kth_key(const T* x, const float* residual, const int64_t* index, int64_t m, int64_t k,
                 std::vector<uint32_t>& heap) {
  auto key_at = [&](int64_t i) {
    const int64_t j = index[i];
    return magnitude_key(to_f32(x[j]) + residual[j]);
  };
  heap.clear();
  for (int64_t i = 0; i < k; ++i) heap.push_back(key_at(i));
  std::make_heap(heap.begin(), heap.end(), std::greater<uint32_t>());
  for (int64_t i = k; i < m; ++i) {
    const uint32_t key = key_at(i);
    if (key > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<uint32_t>());
      heap.back() = key;
      std::push_heap(heap.begin(), heap.end(), std::greater<uint32_t>());
    }
  }
  return heap.front();  // the smallest of the k largest: the k-th largest
}

// The segment of position p: the last start <= p (-1 below the first).
int64_t segment_of(const int64_t* starts, int64_t num_segments, int64_t p) {
  return (std::upper_bound(starts, starts + num_segments, p) - starts) - 1;
}

}  // namespace

Status rule_estimate(const RuleEstimate& a, int threads) {
  if (!known_dtype(a.dtype)) return Status{1, "rule_estimate", "unknown dtype code"};
  for (int64_t u = 0; u < a.num_units; ++u) {
    const int64_t m = a.bounds[u + 1] - a.bounds[u];
    if (m <= 0 || a.ks[u] < 1 || a.ks[u] > m)
      return Status{1, "rule_estimate", "bad sample bounds or order statistic"};
  }
  return guarded("rule_estimate", [&] {
    return dispatch_float(a.dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* x = static_cast<const T*>(a.x);
      parallel_for(threads, a.num_units, [&](int64_t u) {
        std::vector<uint32_t> keys;
        const uint32_t key = kth_key(x, a.residual, a.index + a.bounds[u],
                                     a.bounds[u + 1] - a.bounds[u], a.ks[u], keys);
        // The k-th magnitude's bit pattern (NaN: all ones), times the parameter's scale.
        const float tau = a.scales[a.unit_segment[u]] * float_of(key);
        a.thresholds[a.unit_slot[u]] = tau < kFloor ? kFloor : tau;  // a NaN stays
      });
      return Status{};
    });
  });
}

Status rule_step(const RuleStep& a) {
  const int64_t S = a.num_segments;
  if (S < 1 || a.patience < 1) return Status{1, "rule_step", "bad segment count or patience"};
  return guarded("rule_step", [&] {
    // 1. Kept counts per segment from the positions this rank sent.
    std::vector<int64_t> counts(static_cast<size_t>(S), 0);
    auto add = [&](int64_t p) {
      const int64_t s = segment_of(a.starts, S, p);
      if (s >= 0) ++counts[static_cast<size_t>(s)];
    };
    if (a.rows != nullptr) {
      for (int64_t r = 0; r < a.num_rows; ++r) {
        const uint8_t* row = a.rows + r * a.row_bytes;
        const int64_t used = min64(max64(load<int32_t>(row + a.count_offset), 0), a.capacity);
        const int64_t shift = a.row_shift != nullptr ? a.row_shift[r] : 0;
        for (int64_t i = 0; i < used; ++i)
          add(static_cast<int64_t>(load<int32_t>(row + a.index_offset + 4 * i)) + shift);
      }
    } else {
      for (int64_t i = 0; i < a.num_positions; ++i)
        if (a.valid[i]) add(a.positions[i] + a.position_shift);
    }
    // 2. Averages, the scales' steps, the band's fixed-point sums.
    const bool overflowed = *a.overflowed != 0;
    int64_t total = 0, live_total = 0, live_low = 0;
    std::vector<int> steps(static_cast<size_t>(S));
    for (int64_t s = 0; s < S; ++s) {
      const size_t i = static_cast<size_t>(s);
      // a + (c - a) * 0.125: separate fp32 operations, as the composition's.
      const float d = (static_cast<float>(counts[i]) - a.averages[s]) * 0.125f;
      const float average = a.averages[s] + d;
      a.averages[s] = average;
      const double a1 = static_cast<double>(average) + 1.0;
      const double k1 = static_cast<double>(a.ks[s] + 1);
      int up = 0, down = 0;
      for (int j = 0; j < 8; ++j) {
        up += (a1 * 1000.0 >= k1 * a.marks[j]) ? 1 : 0;
        down += (a1 * a.marks[j] < k1 * 1000.0) ? 1 : 0;
      }
      if (overflowed || (a.capped != nullptr && a.capped[s])) {
        up = up < 1 ? 1 : up;
        down = 0;
      }
      steps[i] = up - down;
      if (a.sparse[s]) {
        const int64_t fixed =
            static_cast<int64_t>(std::floor(static_cast<double>(average) * kFixed));
        total += fixed;
        if (a.thresholds[s] > kFloor) {  // false for NaN, as the composition's
          live_total += fixed;
          live_low += a.low[s] * static_cast<int64_t>(kFixed);
        }
      }
      a.counts[s] = counts[i];
    }
    const bool out = total > a.high_total * static_cast<int64_t>(kFixed) || overflowed ||
                     live_total < live_low;
    // 3. Streaks, flags, scales.
    for (int64_t s = 0; s < S; ++s) {
      const bool step_out = out && a.sparse[s];
      a.streaks[s] = step_out ? a.streaks[s] + 1 : 0;
      a.flags[s] = a.streaks[s] >= a.patience ? 1 : 0;
      if (a.adjustable[s]) {
        float scale = a.scales[s] * a.multipliers[steps[static_cast<size_t>(s)] + 8];
        scale = scale < a.scale_min ? a.scale_min : (scale > a.scale_max ? a.scale_max : scale);
        a.scales[s] = scale;
      }
    }
    return Status{};
  });
}

}  // namespace dct_cpu
