// Python bindings of the host core (module dct_kernels._cpu).
//
// Pointers arrive as integers (tensor.data_ptr()); nothing here knows torch. Every argument is
// keyword-only and named as in dct_cpu.h (and as in the CUDA bindings where both cores take
// it), so a call that swaps two integers fails instead of running. Every kernel runs with the
// GIL released, on up to `threads` threads. An argument rejected here (dtype or value code,
// header words, list lengths) raises ValueError before the kernel runs; a failed status raises
// RuntimeError naming the kernel. What this module shares with the CUDA one is in
// csrc/binding.h.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../binding.h"
#include "dct_cpu.h"
#include "key_scan.h"

namespace py = pybind11;
using dct_cpu::DType;
using py::arg;
using namespace dct::binding;

namespace dct {
namespace binding {

// Checked here, before the kernel runs: a ValueError while the GIL is still held.
DType dtype_of(int code) {
  if (!dct::known_dtype(static_cast<DType>(code)))
    throw std::invalid_argument("dtype code must be 0, 1 or 2");
  return static_cast<DType>(code);
}

const char* const kCoreName = "cpu core";

std::string reason(const Status& status) { return status.what; }

}  // namespace binding
}  // namespace dct

namespace {

std::array<int32_t, 4> header_words(const std::vector<int32_t>& header) {
  if (header.size() != 4) throw std::invalid_argument("header: expected 4 int32 words");
  return {header[0], header[1], header[2], header[3]};
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "dct_kernels host core: kernels over raw host pointers, run with the GIL released";

  m.def("select_threshold", [](uintptr_t x, int dtype, const std::vector<int64_t>& offsets,
                               const std::vector<int64_t>& ks, uintptr_t out, int threads) {
    if (offsets.size() != ks.size() + 1 || ks.empty())
      throw std::invalid_argument("select_threshold: need S >= 1 ks and S + 1 offsets");
    const DType d = dtype_of(dtype);
    run_without_gil([&] {
      return dct_cpu::select_threshold(ptr<const void>(x), d, offsets.data(), ks.data(),
                                       static_cast<int>(ks.size()), ptr<void>(out), threads);
    });
  }, "Per segment, the k-th largest magnitude of x into out (x's dtype).", py::kw_only(),
     arg("x"), arg("dtype"), arg("offsets"), arg("ks"), arg("out"), arg("threads"));

  m.def("count_kept", [](uintptr_t x, int dtype, int64_t n, uintptr_t residual,
                         uintptr_t thresholds, uintptr_t offsets, int num_segments,
                         int threads) {
    const dct_cpu::CompressArgs a =
        compress_args(x, dtype, n, residual, thresholds, offsets, num_segments);
    int64_t count = 0;
    run_without_gil([&] { return dct_cpu::count_kept(a, &count, threads); });
    return count;
  }, "Number of entries of x (+ residual) whose magnitude reaches their threshold.",
     py::kw_only(), arg("x"), arg("dtype"), arg("n"), arg("residual"), arg("thresholds"),
     arg("offsets"), arg("num_segments"), arg("threads"));

  m.def("compress", [](uintptr_t x, int dtype, int64_t n, uintptr_t residual,
                       uintptr_t thresholds, uintptr_t offsets, int num_segments,
                       uintptr_t payload, int64_t capacity, int value_dtype, int threads) {
    const dct_cpu::CompressArgs a =
        compress_args(x, dtype, n, residual, thresholds, offsets, num_segments);
    const DType w = dtype_of(value_dtype);
    run_without_gil(
        [&] { return dct_cpu::compress(a, ptr<uint8_t>(payload), capacity, w, threads); });
  }, "Threshold, compaction into the wire buffer and the residual update.", py::kw_only(),
     arg("x"), arg("dtype"), arg("n"), arg("residual"), arg("thresholds"), arg("offsets"),
     arg("num_segments"), arg("payload"), arg("capacity"), arg("value_dtype"), arg("threads"));

  m.def("decompress", [](uintptr_t buffers, int64_t row_bytes, int64_t numel, int64_t capacity,
                         int value_dtype, const std::vector<int32_t>& header, uintptr_t out,
                         int out_dtype, bool accumulate, uintptr_t errors, int threads) {
    const dct_cpu::PayloadRows p =
        payload_rows(buffers, 1, row_bytes, numel, capacity, value_dtype, header_words(header));
    const DType o = dtype_of(out_dtype);
    run_without_gil([&] {
      return dct_cpu::decompress(p, ptr<void>(out), o, accumulate, ptr<int32_t>(errors),
                                 threads);
    });
  }, "Checked scatter of one wire buffer into out.", py::kw_only(), arg("buffers"),
     arg("row_bytes"), arg("numel"), arg("capacity"), arg("value_dtype"), arg("header"),
     arg("out"), arg("out_dtype"), arg("accumulate"), arg("errors"), arg("threads"));

  m.def("decompress_many", [](uintptr_t buffers, int num_rows, int64_t row_bytes, int64_t numel,
                              int64_t capacity, int value_dtype,
                              const std::vector<int32_t>& header, uintptr_t out, int out_dtype,
                              bool accumulate, bool average, uintptr_t errors, int threads) {
    const dct_cpu::PayloadRows p =
        payload_rows(buffers, num_rows, row_bytes, numel, capacity, value_dtype,
                     header_words(header));
    const DType o = dtype_of(out_dtype);
    run_without_gil([&] {
      return dct_cpu::decompress_many(p, ptr<void>(out), o, accumulate, average,
                                      ptr<int32_t>(errors), threads);
    });
  }, "Rank-ordered fp32 sum of W wire buffers into out.", py::kw_only(), arg("buffers"),
     arg("num_rows"), arg("row_bytes"), arg("numel"), arg("capacity"), arg("value_dtype"),
     arg("header"), arg("out"), arg("out_dtype"), arg("accumulate"), arg("average"),
     arg("errors"), arg("threads"));

  // Wire format version 2: the layout's byte offsets come from dct_kernels/payload.py. They are
  // layout_offsets in every call, never mistaken for the segment offsets compress_ranges takes.
  auto wire_v2 = [](int64_t capacity, int value_code, bool delta, int64_t num_scales,
                    const std::vector<int64_t>& layout_offsets) {
    if (!dct_cpu::known_value_code(value_code))
      throw std::invalid_argument("value code must be 0, 1, 2 or 3");
    if (layout_offsets.size() != 4)
      throw std::invalid_argument("layout_offsets: expected bounds, scales, indices, values");
    dct_cpu::WireV2 w;
    w.capacity = capacity;
    w.value_code = value_code;
    w.delta = delta;
    w.num_scales = num_scales;
    w.bounds_offset = layout_offsets[0];
    w.scales_offset = layout_offsets[1];
    w.indices_offset = layout_offsets[2];
    w.values_offset = layout_offsets[3];
    return w;
  };

  m.def("encode_v2", [wire_v2](uintptr_t out, int64_t capacity, int value_code, bool delta,
                               int64_t num_scales, const std::vector<int64_t>& layout_offsets,
                               uintptr_t cand_index, uintptr_t cand_values,
                               int cand_value_code, int64_t cand_count, int64_t cand_overflow,
                               int64_t position_offset,
                               const std::vector<int64_t>& scale_offsets, uintptr_t residual) {
    const dct_cpu::WireV2 w = wire_v2(capacity, value_code, delta, num_scales, layout_offsets);
    if (value_code == dct::wire::kCodeFloat8E4M3FN &&
        static_cast<int64_t>(scale_offsets.size()) != num_scales + 1)
      throw std::invalid_argument("scale_offsets: expected num_scales + 1 offsets");
    if (!dct::known_dtype(static_cast<DType>(cand_value_code)))
      throw std::invalid_argument("candidate value code must be 0, 1 or 2");
    run_without_gil([&] {
      return dct_cpu::encode_v2(w, ptr<uint8_t>(out), ptr<const int32_t>(cand_index),
                                ptr<const void>(cand_values), cand_value_code, cand_count,
                                cand_overflow, position_offset, scale_offsets.data(),
                                ptr<float>(residual));
    });
  }, "Wire format version 2 from a compress kernel's candidates (dct_kernels/codec.py).",
     py::kw_only(), arg("out"), arg("capacity"), arg("value_code"), arg("delta"),
     arg("num_scales"), arg("layout_offsets"), arg("cand_index"), arg("cand_values"),
     arg("cand_value_code"), arg("cand_count"), arg("cand_overflow"), arg("position_offset"),
     arg("scale_offsets"), arg("residual"));

  // ops.compress_shards in one call; v2 false: version 1 (the layout arguments unused).
  m.def("compress_ranges", [wire_v2](uintptr_t x, int dtype, int64_t n, uintptr_t residual,
                                     uintptr_t thresholds, const std::vector<int64_t>& cuts,
                                     const std::vector<int64_t>& offsets,
                                     const std::vector<int64_t>& offset_starts,
                                     const std::vector<int32_t>& header, uintptr_t rows,
                                     int64_t row_bytes, int64_t capacity, int value_code,
                                     bool v2, bool delta, int64_t num_scales,
                                     const std::vector<int64_t>& layout_offsets,
                                     int cand_value_code,
                                     const std::vector<int64_t>& scale_offsets, int threads) {
    if (cuts.size() < 2 || offset_starts.size() != cuts.size() ||
        static_cast<size_t>(offset_starts.back()) != offsets.size() ||
        header.size() != static_cast<size_t>(dct::wire::kHeaderWords))
      throw std::invalid_argument("compress_ranges: need W + 1 cuts and offset starts, the "
                                  "offsets they index and 8 header words");
    const dct_cpu::CompressArgs a = compress_args(x, dtype, n, residual, thresholds, 0, 1);
    dct_cpu::RangesV2 ranges;
    DType w = DType::kFloat32;
    if (v2) {
      ranges.wire = wire_v2(capacity, value_code, delta, num_scales, layout_offsets);
      ranges.candidate_dtype = dtype_of(cand_value_code);
      if (num_scales > 0) {
        if (scale_offsets.size() != (cuts.size() - 1) * static_cast<size_t>(num_scales + 1))
          throw std::invalid_argument("scale_offsets: expected num_scales + 1 per range");
        ranges.scale_offsets = scale_offsets.data();
      }
    } else {
      w = dtype_of(value_code);
    }
    run_without_gil([&] {
      return dct_cpu::compress_ranges(a, cuts.data(), static_cast<int>(cuts.size() - 1),
                                      offsets.data(), offset_starts.data(), header.data(),
                                      ptr<uint8_t>(rows), row_bytes, capacity, w,
                                      v2 ? &ranges : nullptr, threads);
    });
  }, "compress of W contiguous ranges into the W rows of one send buffer.", py::kw_only(),
     arg("x"), arg("dtype"), arg("n"), arg("residual"), arg("thresholds"), arg("cuts"),
     arg("offsets"), arg("offset_starts"), arg("header"), arg("rows"), arg("row_bytes"),
     arg("capacity"), arg("value_code"), arg("v2"), arg("delta"), arg("num_scales"),
     arg("layout_offsets"), arg("cand_value_code"), arg("scale_offsets"), arg("threads"));

  m.def("decompress_v2", [wire_v2](uintptr_t buffers, int num_rows, int64_t row_bytes,
                                   int64_t numel, int64_t capacity, int value_code, bool delta,
                                   int64_t num_scales,
                                   const std::vector<int64_t>& layout_offsets,
                                   const std::vector<int32_t>& expected, uintptr_t out,
                                   int out_dtype, bool accumulate, bool average, bool many,
                                   uintptr_t errors, int threads) {
    const dct_cpu::WireV2 w = wire_v2(capacity, value_code, delta, num_scales, layout_offsets);
    if (expected.size() != static_cast<size_t>(dct::wire::kHeaderWords))
      throw std::invalid_argument("expected: 8 header words");
    const DType o = dtype_of(out_dtype);
    run_without_gil([&] {
      return dct_cpu::decompress_v2(w, ptr<const uint8_t>(buffers), num_rows, row_bytes, numel,
                                    expected.data(), ptr<void>(out), o, accumulate, average,
                                    many, ptr<int32_t>(errors), threads);
    });
  }, "Checked decode of version-2 rows into out, as decompress or decompress_many.",
     py::kw_only(), arg("buffers"), arg("num_rows"), arg("row_bytes"), arg("numel"),
     arg("capacity"), arg("value_code"), arg("delta"), arg("num_scales"),
     arg("layout_offsets"), arg("expected"), arg("out"), arg("out_dtype"), arg("accumulate"),
     arg("average"), arg("many"), arg("errors"), arg("threads"));

  m.def("rule_estimate", [](uintptr_t x, int dtype, uintptr_t residual, uintptr_t index,
                            const std::vector<int64_t>& bounds, const std::vector<int64_t>& ks,
                            uintptr_t unit_segment, uintptr_t unit_slot, uintptr_t scales,
                            uintptr_t thresholds, int threads) {
    if (bounds.size() != ks.size() + 1)
      throw std::invalid_argument("rule_estimate: need U ks and U + 1 bounds");
    dct_cpu::RuleEstimate a;
    a.x = ptr<const void>(x);
    a.dtype = dtype_of(dtype);
    a.residual = ptr<const float>(residual);
    a.index = ptr<const int64_t>(index);
    a.bounds = bounds.data();
    a.ks = ks.data();
    a.unit_segment = ptr<const int64_t>(unit_segment);
    a.unit_slot = ptr<const int64_t>(unit_slot);
    a.scales = ptr<const float>(scales);
    a.thresholds = ptr<float>(thresholds);
    a.num_units = static_cast<int64_t>(ks.size());
    run_without_gil([&] { return dct_cpu::rule_estimate(a, threads); });
  }, "The threshold rule's estimate: scale times each unit's sample quantile.", py::kw_only(),
     arg("x"), arg("dtype"), arg("residual"), arg("index"), arg("bounds"), arg("ks"),
     arg("unit_segment"), arg("unit_slot"), arg("scales"), arg("thresholds"), arg("threads"));

  // The rule's constant arrays (tensors: pointers) first, then this step's inputs and state.
  m.def("rule_step", [](int64_t num_segments, uintptr_t starts, uintptr_t ks, uintptr_t low,
                        uintptr_t sparse, uintptr_t adjustable, int64_t high_total,
                        int64_t patience, uintptr_t marks, uintptr_t multipliers,
                        float scale_min, float scale_max, uintptr_t thresholds,
                        uintptr_t overflowed, uintptr_t capped, uintptr_t rows,
                        int64_t num_rows, int64_t row_bytes, int64_t count_offset,
                        int64_t index_offset, int64_t capacity, uintptr_t row_shift,
                        uintptr_t positions, uintptr_t valid, int64_t num_positions,
                        int64_t position_shift, uintptr_t averages, uintptr_t scales,
                        uintptr_t streaks, uintptr_t flags, uintptr_t counts) {
    dct_cpu::RuleStep a;
    a.num_segments = num_segments;
    a.starts = ptr<const int64_t>(starts);
    a.ks = ptr<const int64_t>(ks);
    a.low = ptr<const int64_t>(low);
    a.sparse = ptr<const uint8_t>(sparse);
    a.adjustable = ptr<const uint8_t>(adjustable);
    a.high_total = high_total;
    a.patience = patience;
    a.marks = ptr<const double>(marks);
    a.multipliers = ptr<const float>(multipliers);
    a.scale_min = scale_min;
    a.scale_max = scale_max;
    a.thresholds = ptr<const float>(thresholds);
    a.overflowed = ptr<const uint8_t>(overflowed);
    a.capped = ptr<const uint8_t>(capped);
    a.rows = ptr<const uint8_t>(rows);
    a.num_rows = num_rows;
    a.row_bytes = row_bytes;
    a.count_offset = count_offset;
    a.index_offset = index_offset;
    a.capacity = capacity;
    a.row_shift = ptr<const int64_t>(row_shift);
    a.positions = ptr<const int64_t>(positions);
    a.valid = ptr<const uint8_t>(valid);
    a.num_positions = num_positions;
    a.position_shift = position_shift;
    a.averages = ptr<float>(averages);
    a.scales = ptr<float>(scales);
    a.streaks = ptr<int32_t>(streaks);
    a.flags = ptr<uint8_t>(flags);
    a.counts = ptr<int64_t>(counts);
    run_without_gil([&] { return dct_cpu::rule_step(a); });
  }, "One step of the threshold rule: counts, averages, scales, streaks, flags.",
     py::kw_only(), arg("num_segments"), arg("starts"), arg("ks"), arg("low"), arg("sparse"),
     arg("adjustable"), arg("high_total"), arg("patience"), arg("marks"), arg("multipliers"),
     arg("scale_min"), arg("scale_max"), arg("thresholds"), arg("overflowed"), arg("capped"),
     arg("rows"), arg("num_rows"), arg("row_bytes"), arg("count_offset"), arg("index_offset"),
     arg("capacity"), arg("row_shift"), arg("positions"), arg("valid"), arg("num_positions"),
     arg("position_shift"), arg("averages"), arg("scales"), arg("streaks"), arg("flags"),
     arg("counts"));

  m.def("compress_rows", [](uintptr_t x, int dtype, int64_t rows, int64_t columns, int64_t k,
                            uintptr_t indices, int index_bytes, uintptr_t values,
                            int value_dtype, int threads) {
    const DType d = dtype_of(dtype), w = dtype_of(value_dtype);
    run_without_gil([&] {
      return dct_cpu::compress_rows(ptr<const void>(x), d, rows, columns, k, ptr<void>(indices),
                                    index_bytes, ptr<void>(values), w, threads);
    });
  }, "Per row, the k largest magnitudes (ties to the lower column), columns ascending.",
     py::kw_only(), arg("x"), arg("dtype"), arg("rows"), arg("columns"), arg("k"),
     arg("indices"), arg("index_bytes"), arg("values"), arg("value_dtype"), arg("threads"));

  m.def("decompress_rows", [](uintptr_t indices, int index_bytes, uintptr_t values,
                              int value_dtype, int64_t rows, int64_t columns, int64_t k,
                              uintptr_t out, int out_dtype, int threads) {
    const DType v = dtype_of(value_dtype), o = dtype_of(out_dtype);
    run_without_gil([&] {
      return dct_cpu::decompress_rows(ptr<const void>(indices), index_bytes,
                                      ptr<const void>(values), v, rows, columns, k,
                                      ptr<void>(out), o, threads);
    });
  }, "Dense [B, D] rows from a row payload.", py::kw_only(), arg("indices"),
     arg("index_bytes"), arg("values"), arg("value_dtype"), arg("rows"), arg("columns"),
     arg("k"), arg("out"), arg("out_dtype"), arg("threads"));

  m.def("gather_rows", [](uintptr_t y, int dtype, int64_t rows, int64_t columns, int64_t k,
                          uintptr_t indices, int index_bytes, uintptr_t out, int threads) {
    const DType d = dtype_of(dtype);
    run_without_gil([&] {
      return dct_cpu::gather_rows(ptr<const void>(y), d, rows, columns, k,
                                  ptr<const void>(indices), index_bytes, ptr<void>(out),
                                  threads);
    });
  }, "y at a row payload's positions.", py::kw_only(), arg("y"), arg("dtype"), arg("rows"),
     arg("columns"), arg("k"), arg("indices"), arg("index_bytes"), arg("out"), arg("threads"));

  // For tests: every implementation of the row top-k's vector pass gives the same bits.
  m.def("_key_scan_isas", [] {
    int count = 0;
    const char* const* names = dct_cpu::key_scan_isas(&count);
    return std::vector<std::string>(names, names + count);
  }, "The implementations of the row scan this CPU can run, lowest first.");
  m.def("_key_scan_isa", [] { return std::string(dct_cpu::key_scan_isa()); },
        "The implementation of the row scan in use.");
  m.def("_set_key_scan_isa", [](const std::string& isa) {
    if (!dct_cpu::set_key_scan_isa(isa.c_str()))
      throw std::invalid_argument("isa: '" + isa + "' cannot run here");
  }, "Selects an implementation of the row scan by name (one of _key_scan_isas()).",
     py::kw_only(), arg("isa"));
}
