// The C++ API that both compiled cores share: the CUDA core (csrc/cuda/dct_cuda.h) and the
// host core (csrc/cpu/dct_cpu.h) take the same dtype codes and argument structs and report
// failures with the same Status, so one set of binding helpers (csrc/binding.h) serves both
// and a caller moving between them changes only the pointers and the trailing "where it
// runs" argument (a cudaStream_t, or a thread count).
//
// Nothing here includes a CUDA or torch header: the host core builds with a plain C++17
// compiler. Each core's own header adds only its entry points (the row ops through
// DCT_DECLARE_ROW_OPS below, as only their last argument differs) and, for CUDA, the
// scratch-size queries of the ops whose scratch the caller allocates.
#pragma once

#include <cstddef>
#include <cstdint>

#include "wire_format.h"

namespace dct {

// The wire's value dtype codes (wire_format.h): the values of a payload, and every dtype
// argument of either core, are fp32, fp16 or bf16.
enum class DType : int {
  kFloat32 = wire::kCodeFloat32,
  kFloat16 = wire::kCodeFloat16,
  kBFloat16 = wire::kCodeBFloat16,
};

// A DType arrives from Python as any int (its underlying type), so the cores check each dtype
// argument with this before reading any data: an unknown code is never read as fp32.
inline bool known_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

// Column indices of a row payload (compress_rows and its inverse) are int16 or int32.
inline bool known_index_bytes(int bytes) { return bytes == 2 || bytes == 4; }

// What every entry point returns: ok(), or the op that failed and why.
struct Status {
  int code = 0;            // 0: success. The CUDA core: a cudaError_t; the host core: 1
  const char* where = "";  // the op, and the kernel, step or argument that failed
  const char* what = "";   // the host core: why (the CUDA core's reason is its error code)
  // The CUDA core sets this when it rejects an argument before any CUDA call (code is then
  // cudaErrorInvalidValue and `where` names the op and the argument); the bindings raise
  // ValueError for it and RuntimeError for every other failure. The host core reports bad
  // arguments as plain failures.
  bool bad_argument = false;
  bool ok() const { return code == 0; }
};

// ---------------------------------------------------------------------------------- compress
// count_kept and compress: acc = x (+ residual) in fp32; an entry is kept when |acc| reaches
// thresholds[segment] in magnitude order. Pointers are device pointers for the CUDA core and
// host pointers for the host core. x and residual may be the same fp32 array.
struct CompressArgs {
  const void* x = nullptr;
  DType dtype = DType::kFloat32;
  int64_t n = 0;
  float* residual = nullptr;           // updated in place by compress, may be nullptr
  const float* thresholds = nullptr;   // [S]
  const int64_t* offsets = nullptr;    // [S+1] segment offsets, or nullptr for one segment
  int num_segments = 1;
};

// -------------------------------------------------------------------------------- decompress
// decompress and decompress_many: W wire buffers of row_bytes each (the rows of one
// [W, row_bytes] uint8 array). A row is used only when its header matches the expected one; an
// entry is skipped (and counted in the op's error count) when its index is outside [0, numel)
// or not above every earlier in-range index of its row.
struct PayloadRows {
  const uint8_t* buffers = nullptr;
  int num_rows = 1;
  int64_t row_bytes = 0;
  int64_t numel = 0;
  int64_t capacity = 0;
  DType value_dtype = DType::kFloat32;
  // Header words kWordMagic .. kWordNumelHigh (wire_format.h) that every row must carry:
  // magic, version | codes, numel low, numel high.
  int32_t expected_header[4] = {0, 0, 0, 0};
};

}  // namespace dct

// ------------------------------------------------------------------------------------- rows
// The row ops take the same arguments in both cores but the last, which says where the call
// runs (the CUDA core: the cudaStream_t it enqueues on; the host core: the number of threads);
// each core's header declares them, in its own namespace, with DCT_DECLARE_ROW_OPS(that
// parameter).
//
// compress_rows: x: [B, D]; writes [B, k] column indices (int16 when index_bytes == 2, int32
// when 4) ascending and values in value_dtype: the k largest magnitudes of each row, ties to
// the lower column.
// decompress_rows: out: [B, D] zeroed, then the entries whose column lies in [0, D).
// gather_rows: out: [B, k] = y at the given columns, 0 for a column outside [0, D).
#define DCT_DECLARE_ROW_OPS(WHERE)                                                          \
  Status compress_rows(const void* x, DType dtype, int64_t rows, int64_t columns, int64_t k, \
                       void* indices, int index_bytes, void* values, DType value_dtype,      \
                       WHERE);                                                               \
  Status decompress_rows(const void* indices, int index_bytes, const void* values,          \
                         DType value_dtype, int64_t rows, int64_t columns, int64_t k,       \
                         void* out, DType out_dtype, WHERE);                                \
  Status gather_rows(const void* y, DType dtype, int64_t rows, int64_t columns, int64_t k,  \
                     const void* indices, int index_bytes, void* out, WHERE)
