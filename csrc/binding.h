// What the two pybind11 modules (csrc/cuda/bindings.cpp: dct_kernels._cuda, and
// csrc/cpu/bindings.cpp: dct_kernels._cpu) do alike: pointers from the integers Python passes
// (tensor.data_ptr(); nothing here knows torch), the argument structs of dct_api.h from flat
// arguments, and a failed Status turned into a Python exception that names the kernel.
//
// Where the modules differ, each defines the declarations below for itself (each is linked
// into its own module): how it reads a dtype code, its name in messages, and how it words the
// reason of a failed Status.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dct_api.h"

namespace dct {
namespace binding {

namespace py = pybind11;

// Defined by each module.
DType dtype_of(int code);           // the dtype argument `code` as a DType
extern const char* const kCoreName;  // "CUDA core", "cpu core"
std::string reason(const Status& status);  // what follows "failed: " for a failed status

template <typename P>
P* ptr(uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

// Raises for a failed status: ValueError for an argument the core rejected before doing any
// work, RuntimeError otherwise; both name the core and the kernel (or argument).
inline void check(const Status& status) {
  if (status.ok()) return;
  const std::string prefix = std::string("dct_kernels ") + kCoreName + ": ";
  if (status.bad_argument) throw py::value_error(prefix + status.where);
  throw std::runtime_error(prefix + status.where + " failed: " + reason(status));
}

// Runs a kernel with the GIL released (so other Python threads run meanwhile), then raises
// for a failed status holding the GIL again.
template <typename F>
void run_without_gil(F&& kernel) {
  Status status;
  {
    py::gil_scoped_release release;
    status = kernel();
  }
  check(status);
}

inline CompressArgs compress_args(uintptr_t x, int dtype, int64_t n, uintptr_t residual,
                                  uintptr_t thresholds, uintptr_t offsets, int num_segments) {
  CompressArgs a;
  a.x = ptr<const void>(x);
  a.dtype = dtype_of(dtype);
  a.n = n;
  a.residual = ptr<float>(residual);
  a.thresholds = ptr<const float>(thresholds);
  a.offsets = ptr<const int64_t>(offsets);
  a.num_segments = num_segments;
  return a;
}

// header: the expected words (magic, version | codes, numel low, numel high), which each module
// takes from Python in its own way.
inline PayloadRows payload_rows(uintptr_t buffers, int num_rows, int64_t row_bytes,
                                int64_t numel, int64_t capacity, int value_dtype,
                                const std::array<int32_t, 4>& header) {
  PayloadRows p;
  p.buffers = ptr<const uint8_t>(buffers);
  p.num_rows = num_rows;
  p.row_bytes = row_bytes;
  p.numel = numel;
  p.capacity = capacity;
  p.value_dtype = dtype_of(value_dtype);
  for (int i = 0; i < 4; ++i) p.expected_header[i] = header[i];
  return p;
}

}  // namespace binding
}  // namespace dct
