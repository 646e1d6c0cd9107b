// dct_kernels CUDA core: the kernels of every op over raw device pointers and a stream.
//
// Framework-agnostic on purpose: nothing here knows torch. The types (DType, Status,
// CompressArgs, PayloadRows) are the ones both cores share (csrc/dct_api.h); this header adds
// what is the CUDA core's own. Callers pass device pointers, element counts, dtype codes and a
// cudaStream_t, and allocate the scratch ("workspace") whose size the *_workspace_bytes
// functions report. Every function only enqueues work on the stream (no host synchronization)
// and returns a Status naming the first CUDA call or kernel launch that failed. Arguments the
// core cannot take (a dtype code other than 0, 1, 2; an index width other than 2 or 4 bytes)
// are rejected before any CUDA call, with a Status whose bad_argument is set.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../dct_api.h"

namespace dct {

// The CUDA error a Status of this core carries (cudaSuccess when it is ok()).
inline cudaError_t cuda_error(const Status& status) {
  return static_cast<cudaError_t>(status.code);
}

// ---------------------------------------------------------------------------- select_threshold
// offsets: [S+1] int64 segment offsets. items: [num_items][3] int64 (begin, end, segment): the
// elements split into chunks that never cross a segment boundary. ks: [S] int64,
// 1 <= k <= segment length. out: [S] in x's dtype, the k-th largest magnitude of each segment
// (the bit pattern of |x|; NaN as the all-ones pattern). candidate_capacity: how many keys the
// candidate pool of the workspace holds (more: fewer fallbacks to extra passes over x).
size_t select_threshold_workspace_bytes(int num_segments, int64_t candidate_capacity);
Status select_threshold(const void* x, DType dtype, const int64_t* offsets, const int64_t* items,
                        int num_items, const int64_t* ks, int num_segments,
                        int64_t candidate_capacity, void* out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------- compress
// CompressArgs (dct_api.h), all pointers on the device.

// count: one uint64 on the device, *added to* (zero it first).
Status count_kept(const CompressArgs& args, unsigned long long* count, cudaStream_t stream);

size_t compress_workspace_bytes(int64_t n);
// payload: the wire buffer, header already written; the kernel writes indices, values, count
// and overflow. value_dtype: the wire dtype.
Status compress(const CompressArgs& args, uint8_t* payload, int64_t capacity, DType value_dtype,
                void* workspace, size_t workspace_bytes, cudaStream_t stream);

// -------------------------------------------------------------------------------- decompress
// PayloadRows (dct_api.h) on the device; skipped entries and void rows are counted in *errors.

size_t decompress_workspace_bytes(int num_rows, int64_t capacity, int64_t numel);
// out: numel elements of out_dtype; overwritten (zeros elsewhere), or added to at the sent
// positions with accumulate.
Status decompress(const PayloadRows& rows, void* out, DType out_dtype, bool accumulate,
                  int32_t* errors, void* workspace, size_t workspace_bytes, cudaStream_t stream);
// out = [out +] (0 + d_0 + ... + d_{W-1}) [/ W], summed in fp32 in rank order.
Status decompress_many(const PayloadRows& rows, void* out, DType out_dtype, bool accumulate,
                       bool average, int32_t* errors, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

// ------------------------------------------------------------------------------------- rows
// compress_rows, decompress_rows and gather_rows (dct_api.h), enqueued on `stream`.
DCT_DECLARE_ROW_OPS(cudaStream_t stream);

// Number of visible devices, or the CUDA error that prevents counting them.
Status device_count(int* count);

}  // namespace dct
