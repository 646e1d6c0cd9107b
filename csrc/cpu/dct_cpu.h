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

// ------------------------------------------------------------------------------------- rows
// compress_rows, decompress_rows and gather_rows (dct_api.h), on up to `threads` threads. In
// decompress_rows a column sent twice in a row takes the later value.
DCT_DECLARE_ROW_OPS(int threads);

}  // namespace dct_cpu
