// Python bindings of the CUDA core (module dct_kernels._cuda).
//
// Pointers arrive as integers (tensor.data_ptr()), streams as integers
// (torch.cuda.Stream.cuda_stream); nothing here knows torch. Every argument is keyword-only and
// named as in dct_cuda.h, so a call that swaps two integers fails instead of running. An
// argument the core rejects (dtype code, index width, header words) raises ValueError naming
// it, before any CUDA call; a failed CUDA call or launch raises RuntimeError naming the kernel
// and the CUDA error. What this module shares with the cpu one is in csrc/binding.h.
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <string>

#include "../binding.h"
#include "dct_cuda.h"

namespace py = pybind11;
using py::arg;
using namespace dct::binding;

namespace dct {
namespace binding {

// Any int is a DType value (its underlying type is int); the core rejects unknown codes.
DType dtype_of(int code) { return static_cast<DType>(code); }

const char* const kCoreName = "CUDA core";

std::string reason(const Status& status) {
  cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
  return std::string(cudaGetErrorName(cuda_error(status))) + ": " +
         cudaGetErrorString(cuda_error(status));
}

}  // namespace binding
}  // namespace dct

namespace {

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

std::array<int32_t, 4> header_words(py::tuple header) {
  if (header.size() != 4)
    throw py::value_error("header: expected 4 int32 words (magic, version|codes, numel low, "
                          "numel high)");
  std::array<int32_t, 4> words;
  for (int i = 0; i < 4; ++i) words[i] = header[i].cast<int32_t>();
  return words;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "dct_kernels CUDA core: kernels over raw device pointers and a CUDA stream";

  m.def("device_count", [] {
    int count = 0;
    check(dct::device_count(&count));
    return count;
  }, "Number of CUDA devices; RuntimeError naming the CUDA error when there is none usable.");

  m.def("select_threshold_workspace_bytes", &dct::select_threshold_workspace_bytes,
        py::kw_only(), arg("num_segments"), arg("candidate_capacity"));
  m.def("select_threshold", [](uintptr_t x, int dtype, uintptr_t offsets, uintptr_t items,
                               int num_items, uintptr_t ks, int num_segments,
                               int64_t candidate_capacity, uintptr_t out, uintptr_t workspace,
                               size_t workspace_bytes, uintptr_t stream) {
    check(dct::select_threshold(ptr<const void>(x), dtype_of(dtype), ptr<const int64_t>(offsets),
                                ptr<const int64_t>(items), num_items, ptr<const int64_t>(ks),
                                num_segments,
                                candidate_capacity, ptr<void>(out), ptr<void>(workspace),
                                workspace_bytes, stream_of(stream)));
  }, py::kw_only(), arg("x"), arg("dtype"), arg("offsets"), arg("items"), arg("num_items"),
     arg("ks"), arg("num_segments"), arg("candidate_capacity"), arg("out"), arg("workspace"),
     arg("workspace_bytes"), arg("stream"));

  m.def("count_kept", [](uintptr_t x, int dtype, int64_t n, uintptr_t residual,
                         uintptr_t thresholds, uintptr_t offsets, int num_segments,
                         uintptr_t count, uintptr_t stream) {
    check(dct::count_kept(compress_args(x, dtype, n, residual, thresholds, offsets, num_segments),
                          ptr<unsigned long long>(count), stream_of(stream)));
  }, py::kw_only(), arg("x"), arg("dtype"), arg("n"), arg("residual"), arg("thresholds"),
     arg("offsets"), arg("num_segments"), arg("count"), arg("stream"));

  m.def("compress_workspace_bytes", &dct::compress_workspace_bytes, py::kw_only(), arg("n"));
  m.def("compress", [](uintptr_t x, int dtype, int64_t n, uintptr_t residual,
                       uintptr_t thresholds, uintptr_t offsets, int num_segments,
                       uintptr_t payload, int64_t capacity, int value_dtype, uintptr_t workspace,
                       size_t workspace_bytes, uintptr_t stream) {
    check(dct::compress(compress_args(x, dtype, n, residual, thresholds, offsets, num_segments),
                        ptr<uint8_t>(payload), capacity, dtype_of(value_dtype),
                        ptr<void>(workspace), workspace_bytes, stream_of(stream)));
  }, py::kw_only(), arg("x"), arg("dtype"), arg("n"), arg("residual"), arg("thresholds"),
     arg("offsets"), arg("num_segments"), arg("payload"), arg("capacity"), arg("value_dtype"),
     arg("workspace"), arg("workspace_bytes"), arg("stream"));

  m.def("decompress_workspace_bytes", &dct::decompress_workspace_bytes, py::kw_only(),
        arg("num_rows"), arg("capacity"), arg("numel"));
  m.def("decompress", [](uintptr_t buffers, int num_rows, int64_t row_bytes, int64_t numel,
                         int64_t capacity, int value_dtype, py::tuple header, uintptr_t out,
                         int out_dtype, bool accumulate, uintptr_t errors, uintptr_t workspace,
                         size_t workspace_bytes, uintptr_t stream) {
    check(dct::decompress(payload_rows(buffers, num_rows, row_bytes, numel, capacity,
                                       value_dtype, header_words(header)),
                          ptr<void>(out), dtype_of(out_dtype), accumulate, ptr<int32_t>(errors),
                          ptr<void>(workspace), workspace_bytes, stream_of(stream)));
  }, py::kw_only(), arg("buffers"), arg("num_rows"), arg("row_bytes"), arg("numel"),
     arg("capacity"), arg("value_dtype"), arg("header"), arg("out"), arg("out_dtype"),
     arg("accumulate"), arg("errors"), arg("workspace"), arg("workspace_bytes"), arg("stream"));
  m.def("decompress_many", [](uintptr_t buffers, int num_rows, int64_t row_bytes, int64_t numel,
                              int64_t capacity, int value_dtype, py::tuple header, uintptr_t out,
                              int out_dtype, bool accumulate, bool average, uintptr_t errors,
                              uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
    check(dct::decompress_many(payload_rows(buffers, num_rows, row_bytes, numel, capacity,
                                            value_dtype, header_words(header)),
                               ptr<void>(out), dtype_of(out_dtype), accumulate, average,
                               ptr<int32_t>(errors), ptr<void>(workspace), workspace_bytes,
                               stream_of(stream)));
  }, py::kw_only(), arg("buffers"), arg("num_rows"), arg("row_bytes"), arg("numel"),
     arg("capacity"), arg("value_dtype"), arg("header"), arg("out"), arg("out_dtype"),
     arg("accumulate"), arg("average"), arg("errors"), arg("workspace"), arg("workspace_bytes"),
     arg("stream"));

  m.def("compress_rows", [](uintptr_t x, int dtype, int64_t rows, int64_t columns, int64_t k,
                            uintptr_t indices, int index_bytes, uintptr_t values, int value_dtype,
                            uintptr_t stream) {
    check(dct::compress_rows(ptr<const void>(x), dtype_of(dtype), rows, columns, k,
                             ptr<void>(indices), index_bytes, ptr<void>(values),
                             dtype_of(value_dtype), stream_of(stream)));
  }, py::kw_only(), arg("x"), arg("dtype"), arg("rows"), arg("columns"), arg("k"),
     arg("indices"), arg("index_bytes"), arg("values"), arg("value_dtype"), arg("stream"));
  m.def("decompress_rows", [](uintptr_t indices, int index_bytes, uintptr_t values,
                              int value_dtype, int64_t rows, int64_t columns, int64_t k,
                              uintptr_t out, int out_dtype, uintptr_t stream) {
    check(dct::decompress_rows(ptr<const void>(indices), index_bytes, ptr<const void>(values),
                               dtype_of(value_dtype), rows, columns, k, ptr<void>(out),
                               dtype_of(out_dtype), stream_of(stream)));
  }, py::kw_only(), arg("indices"), arg("index_bytes"), arg("values"), arg("value_dtype"),
     arg("rows"), arg("columns"), arg("k"), arg("out"), arg("out_dtype"), arg("stream"));
  m.def("gather_rows", [](uintptr_t y, int dtype, int64_t rows, int64_t columns, int64_t k,
                          uintptr_t indices, int index_bytes, uintptr_t out, uintptr_t stream) {
    check(dct::gather_rows(ptr<const void>(y), dtype_of(dtype), rows, columns, k,
                           ptr<const void>(indices), index_bytes, ptr<void>(out),
                           stream_of(stream)));
  }, py::kw_only(), arg("y"), arg("dtype"), arg("rows"), arg("columns"), arg("k"),
     arg("indices"), arg("index_bytes"), arg("out"), arg("stream"));
}
