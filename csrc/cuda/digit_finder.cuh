// Radix-select step shared by select_threshold and compress_rows: in a histogram of digit
// counts, find the digit that holds the k-th largest key.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace dct {

// True when key and prefix agree on every bit at or above bit `above`.
__device__ __forceinline__ bool shares_prefix(uint32_t key, uint32_t prefix, int above) {
  return above >= 32 || (key >> above) == (prefix >> above);
}

// Finds the digit d with count(digits > d) < k <= count(digits >= d). Every thread then reads
// s.digit, s.rank (= k - count(digits > d)) and s.count (= count of d). Bins are dealt to
// threads in descending digit order, so one block-wide exclusive sum locates the thread.
template <int THREADS>
struct DigitFinder {
  using Scan = cub::BlockScan<int32_t, THREADS>;
  struct Storage {
    typename Scan::TempStorage scan;
    int32_t digit, rank, count;
  };

  __device__ static void find(const int32_t* hist, int bins, int32_t k, Storage& s) {
    if (threadIdx.x == 0) s.digit = s.rank = s.count = 0;
    __syncthreads();
    const int per = (bins + THREADS - 1) / THREADS;
    const int top = bins - 1 - static_cast<int>(threadIdx.x) * per;  // digits top, top-1, ...
    int32_t local = 0;
    for (int i = 0; i < per && top - i >= 0; ++i) local += hist[top - i];
    int32_t before;
    Scan(s.scan).ExclusiveSum(local, before);
    if (before < k && k <= before + local) {
      int32_t running = before;
      for (int i = 0; i < per && top - i >= 0; ++i) {
        const int32_t c = hist[top - i];
        if (running + c >= k) {
          s.digit = top - i;
          s.rank = k - running;
          s.count = c;
          break;
        }
        running += c;
      }
    }
    __syncthreads();
  }
};

}  // namespace dct
