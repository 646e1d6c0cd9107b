// dct_kernels host (CPU) core: the kernels of every op over raw host pointers.
//
// The host counterpart of csrc/cuda/dct_cuda.h, with the same types (csrc/dct_api.h), argument
// conventions and semantics (docs/design.md) and nothing from torch or CUDA: callers pass
// pointers, element counts, dtype codes and the number of threads that may work on the call
// (the caller's thread included; 1 runs everything on the caller's thread). Results are
// bitwise the same for every thread count: work is cut into pieces by size alone and pieces
// are combined in a fixed order. Scratch memory is allocated here (host allocations are cheap
// next to the passes over the data). Every function returns a Status naming the kernel that
// failed and why (a bad argument, or memory that could not be allocated), with code 1.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../dct_api.h"

namespace dct_cpu {

using dct::CompressArgs;
using dct::DType;
using dct::PayloadRows;
using dct::Status;

// ---------------------------------------------------------------------------- select_threshold
// offsets: [S+1] segment offsets, strictly rising from 0 to n. ks: [S], 1 <= k <= segment
// length. out: [S] in x's dtype, the k-th largest magnitude of each segment (the bit pattern
// of |x|; NaN as the all-ones pattern). Exact for every input.
Status select_threshold(const void* x, DType dtype, const int64_t* offsets, const int64_t* ks,
                        int num_segments, void* out, int threads);

// ---------------------------------------------------------------------------------- compress
// CompressArgs (dct_api.h), all pointers in host memory.

// *count = the number of kept entries.
Status count_kept(const CompressArgs& args, int64_t* count, int threads);

// payload: the wire buffer, header already written, slots zeroed; writes the first
// min(kept, capacity) kept entries in index order, count and overflow, and updates the
// residual (acc minus what was sent; all of acc where nothing was sent; 0 for a sent inf/NaN).
Status compress(const CompressArgs& args, uint8_t* payload, int64_t capacity, DType value_dtype,
                int threads);

// -------------------------------------------------------------------------------- decompress
// PayloadRows (dct_api.h) in host memory, with any alignment. A row whose header does not
// match counts one error; a count outside [0, capacity] counts one error and is clamped; each
// skipped entry below the count counts one. Nothing outside out is ever written.

// out: numel elements of out_dtype; overwritten (zeros elsewhere), or added to at the used
// positions (in fp32, one rounding) with accumulate. *errors is added to.
Status decompress(const PayloadRows& rows, void* out, DType out_dtype, bool accumulate,
                  int32_t* errors, int threads);
// out = [out +] (0 + d_0 + ... + d_{W-1}) [/ W], summed in fp32 in rank order, rounded once.
Status decompress_many(const PayloadRows& rows, void* out, DType out_dtype, bool accumulate,
                       bool average, int32_t* errors, int threads);

// ------------------------------------------------------------------ wire format version 2
// The cpu core's own implementation of dct_kernels/codec.py (docs/design.md, "Wire format
// version 2"), bitwise the same: the byte offsets of the fields come from the caller (the one
// definition of the version-2 layout is dct_kernels/payload.py).
struct WireV2 {
  int64_t capacity = 0;
  int value_code = dct::wire::kCodeFloat32;  // a DType's code, or kCodeFloat8E4M3FN
  bool delta = false;
  int64_t num_scales = 0;
  int64_t bounds_offset = 0, scales_offset = 0, indices_offset = 0, values_offset = 0;
};

// Version 2 adds float8_e4m3fn to the DType codes: a value code, never a DType (no kernel
// reads or writes fp8 tensors; only payloads carry it).
inline bool known_value_code(int code) {
  return dct::known_dtype(static_cast<DType>(code)) || code == dct::wire::kCodeFloat8E4M3FN;
}

// Encodes the candidates a compress kernel wrote (a version-1 payload: cand_index[count],
// cand_values[count] in cand_value_code, fp32 under fp8) into out (zeroed, header written),
// writes count, overflow (cand_overflow + cut) and, for fp8, the scale section; fixes the
// residual up (may be null). scale_offsets: [num_scales + 1] over out's positions.
Status encode_v2(const WireV2& wire, uint8_t* out, const int32_t* cand_index,
                 const void* cand_values, int cand_value_code, int64_t cand_count,
                 int64_t cand_overflow, int64_t position_offset, const int64_t* scale_offsets,
                 float* residual);

// compress_ranges in wire format version 2: the layout, the candidates' dtype (fp32 under fp8
// values, else the wire's) and, for fp8, each range's num_scales + 1 scale offsets back to back.
struct RangesV2 {
  WireV2 wire;
  DType candidate_dtype = DType::kFloat32;
  const int64_t* scale_offsets = nullptr;
};

// ops.compress_shards in one call: num_ranges contiguous ranges of one tensor into the rows of
// one [num_ranges, row_bytes] send buffer. Row s is zeroed and gets `header` (kHeaderWords
// words, numel replaced by the range's length cuts[s+1] - cuts[s]); a non-empty range then
// gets what compress() writes for x[cuts[s]:cuts[s+1]] (residual likewise) with the segments
// offsets[offset_starts[s] .. offset_starts[s+1]) (from 0 to the range's length) and the next
// S_s thresholds of whole.thresholds; with v2, compress() into a scratch payload of the
// candidates and encode_v2() from it (an empty fp8 range: its scale offsets, scales 1), as
// ops.compress does range by range. whole: x, dtype, n (all ranges), residual, thresholds; its
// offsets are not used.
Status compress_ranges(const CompressArgs& whole, const int64_t* cuts, int num_ranges,
                       const int64_t* offsets, const int64_t* offset_starts,
                       const int32_t* header, uint8_t* rows, int64_t row_bytes,
                       int64_t capacity, DType value_dtype, const RangesV2* v2, int threads);

// Decodes W untrusted version-2 rows (expected: the 8 header words, count and overflow not
// compared) and writes out as decompress (many = false, W = 1) or decompress_many would from
// the decoded entries. errors: as for version 1, plus 1 per row for bad scales, 1 for an
// escape beyond 32768 (every entry after it skipped), 1 for a dangling escape.
Status decompress_v2(const WireV2& wire, const uint8_t* buffers, int num_rows,
                     int64_t row_bytes, int64_t numel, const int32_t* expected, void* out,
                     DType out_dtype, bool accumulate, bool average, bool many,
                     int32_t* errors, int threads);

// ------------------------------------------------------------------------- threshold rule
// The DDP hook's threshold rule between exact refreshes (docs/design.md, "Refresh and band"),
// each step one call; bitwise the composition in dct_kernels/distributed/threshold_rule.py.
// Every pointer is host memory the caller trusts (the rule's own state and this rank's own
// payloads).

// thresholds[unit_slot[u]] = max(scales[unit_segment[u]] * q_u, 2^-149) for each unit u, q_u
// the ks[u]-th largest |fp32(x[i]) + residual[i]| over i in index[bounds[u], bounds[u + 1]).
struct RuleEstimate {
  const void* x = nullptr;
  DType dtype = DType::kFloat32;
  const float* residual = nullptr;
  const int64_t* index = nullptr;
  const int64_t* bounds = nullptr;  // [num_units + 1]
  const int64_t* ks = nullptr;      // [num_units]
  const int64_t* unit_segment = nullptr;
  const int64_t* unit_slot = nullptr;
  const float* scales = nullptr;
  float* thresholds = nullptr;
  int64_t num_units = 0;
};
Status rule_estimate(const RuleEstimate& args, int threads);

// One step after a compress: kept counts per segment (into counts), the count averages, the
// scales, the streaks and the early-refresh flags (1 byte each), in place. The kept positions
// come from version-1 rows (num_rows rows of row_bytes: the int32 count at count_offset, the
// int32 indices at index_offset, row_shift[r] added; the count clamped to [0, capacity]) or,
// when rows is null, from positions[i] + position_shift where valid[i].
struct RuleStep {
  int64_t num_segments = 0;
  const int64_t* starts = nullptr;  // [S] segment starts
  const int64_t* ks = nullptr;      // [S] targets
  const int64_t* low = nullptr;     // [S] ceil(low x k)
  const uint8_t* sparse = nullptr;
  const uint8_t* adjustable = nullptr;
  int64_t high_total = 0;  // sum of floor(high x k) over the sparse segments
  int64_t patience = 1;
  const double* marks = nullptr;       // [8] round(1000 x 2^(j/4))
  const float* multipliers = nullptr;  // [17] m(s) for s = -8..8
  float scale_min = 0, scale_max = 0;
  const float* thresholds = nullptr;   // [S] this step's tau
  const uint8_t* overflowed = nullptr; // one byte
  const uint8_t* capped = nullptr;     // [S] or null
  const uint8_t* rows = nullptr;
  int64_t num_rows = 0, row_bytes = 0, count_offset = 0, index_offset = 0, capacity = 0;
  const int64_t* row_shift = nullptr;  // [num_rows] or null
  const int64_t* positions = nullptr;
  const uint8_t* valid = nullptr;
  int64_t num_positions = 0, position_shift = 0;
  float* averages = nullptr;
  float* scales = nullptr;
  int32_t* streaks = nullptr;
  uint8_t* flags = nullptr;
  int64_t* counts = nullptr;
};
Status rule_step(const RuleStep& args);

// ------------------------------------------------------------------------------------- rows
// compress_rows, decompress_rows and gather_rows (dct_api.h), on up to `threads` threads. In
// decompress_rows a column sent twice in a row takes the later value.
DCT_DECLARE_ROW_OPS(int threads);

}  // namespace dct_cpu
