// Wire format version 2, encoding (docs/design.md, "Wire format version 2"): the cpu core's
// version of codec.encode in dct_kernels/codec.py, bitwise the same. One pass over the
// candidates for the fp8 scales, one that quantizes, lays out the escapes and entries in
// slot order, cuts what does not fit and fixes the residual up. Sequential: the candidates are
// about a hundredth of the tensor, and the slot of an entry depends on every gap before it.
#include <cmath>
#include <vector>

#include "common.h"

namespace dct_cpu {
namespace {

constexpr int64_t kEscapeStep = 65535;
constexpr int64_t kMaxMultiplier = 32768;
constexpr int kMinScaleExponent = -140;

// The smallest e >= kMinScaleExponent with amax <= 448 * 2^e (0 for amax == 0); exact:
// 448 * 2^e is exact in double.
int scale_exponent(float amax) {
  if (!(amax > 0.0f)) return 0;
  int e = static_cast<int>(std::ceil(std::log2(static_cast<double>(amax) / 448.0)));
  if (e < kMinScaleExponent - 1) e = kMinScaleExponent - 1;
  while (std::ldexp(448.0, e) < amax) ++e;
  while (e > kMinScaleExponent && std::ldexp(448.0, e - 1) >= amax) --e;
  return e < kMinScaleExponent ? kMinScaleExponent : e;
}

int64_t segment_of(const int64_t* offsets, int64_t num_scales, int64_t position) {
  // The last segment whose start is <= position (offsets never fall), clamped to [0, S-1].
  int64_t lo = 0, hi = num_scales + 1;  // upper_bound over offsets[0..S]
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= position) lo = mid + 1; else hi = mid;
  }
  const int64_t s = lo - 1;
  return s < 0 ? 0 : (s > num_scales - 1 ? num_scales - 1 : s);
}

float candidate_value(const void* values, int code, int64_t j) {
  switch (code) {
    case dct::wire::kCodeFloat16: return to_f32(static_cast<const Half*>(values)[j]);
    case dct::wire::kCodeBFloat16: return to_f32(static_cast<const BFloat16*>(values)[j]);
    default: return static_cast<const float*>(values)[j];
  }
}

uint32_t candidate_bits(const void* values, int code, int64_t j) {
  if (code == dct::wire::kCodeFloat32) return bits_of(static_cast<const float*>(values)[j]);
  return static_cast<const uint16_t*>(values)[j];
}

void store_field(uint8_t* p, int width, uint32_t bits) {
  if (width == 1) *p = static_cast<uint8_t>(bits);
  else if (width == 2) store<uint16_t>(p, static_cast<uint16_t>(bits));
  else store<uint32_t>(p, bits);
}

}  // namespace

Status encode_v2(const WireV2& wire, uint8_t* out, const int32_t* cand_index,
                 const void* cand_values, int cand_value_code, int64_t cand_count,
                 int64_t cand_overflow, int64_t position_offset, const int64_t* scale_offsets,
                 float* residual) {
  return guarded("encode_v2", [&] {
    const bool fp8 = wire.value_code == dct::wire::kCodeFloat8E4M3FN;
    const int width = value_width(wire.value_code);
    const int64_t limit = width == 1 ? 256 : kMaxMultiplier;
    const int64_t S = wire.num_scales;
    std::vector<float> scales(fp8 ? S : 0, 1.0f);
    if (fp8) {
      std::vector<float> amax(S, 0.0f);
      for (int64_t j = 0; j < cand_count; ++j) {
        const float v = static_cast<const float*>(cand_values)[j];
        if (!is_finite(v)) continue;
        const int64_t s = segment_of(scale_offsets, S, cand_index[j] + position_offset);
        const float m = std::fabs(v);
        if (m > amax[s]) amax[s] = m;
      }
      for (int64_t s = 0; s < S; ++s) scales[s] = std::ldexp(1.0f, scale_exponent(amax[s]));
      for (int64_t s = 0; s <= S; ++s)
        store<int32_t>(out + wire.bounds_offset + 4 * s, static_cast<int32_t>(scale_offsets[s]));
      for (int64_t s = 0; s < S; ++s) store<float>(out + wire.scales_offset + 4 * s, scales[s]);
    }
    uint8_t* codes = out + wire.indices_offset;
    uint8_t* fields = out + wire.values_offset;
    int64_t used = 0, cut = 0, previous = -1;
    bool full = false;
    for (int64_t j = 0; j < cand_count; ++j) {
      const int64_t local = cand_index[j];
      const int64_t index = local + position_offset;
      uint32_t bits;
      float decoded = 0.0f, value = 0.0f;
      bool finite = true;
      if (fp8) {
        value = static_cast<const float*>(cand_values)[j];
        finite = is_finite(value);
        if (finite) {
          const float scale = scales[segment_of(scale_offsets, S, index)];
          bits = fp8_from_f32(value / scale);
          decoded = fp8_to_f32(static_cast<uint8_t>(bits)) * scale;
          if (!is_finite(decoded)) {
            // Rounded up past fp32's range (|acc| >= 248 x 2^120 with the scale 2^120): one
            // fp8 step toward zero, so that what is sent decodes finite.
            bits -= 1;
            decoded = fp8_to_f32(static_cast<uint8_t>(bits)) * scale;
          }
        } else {
          bits = 0x7F;
        }
        if ((bits & 0x7F) == 0) {  // rounds to zero: not sent, all of acc stays
          if (residual != nullptr) residual[local] = value;
          continue;
        }
      } else {
        bits = candidate_bits(cand_values, cand_value_code, j);
      }
      int64_t quotient = 0, escapes = 0;
      if (wire.delta) {
        quotient = (index - previous - 1) / kEscapeStep;
        escapes = (quotient + limit - 1) / limit;
      }
      if (!full && used + 1 + escapes > wire.capacity) full = true;
      if (full) {  // cut: this entry and every later one stay in the residual
        ++cut;
        // The kernel left acc - sent (0 under fp8, whose candidates are acc in fp32):
        // adding the value back gives acc exactly (version 1's identity).
        if (residual != nullptr)
          residual[local] = fp8 ? value
                                : residual[local] +
                                      candidate_value(cand_values, cand_value_code, j);
        continue;
      }
      if (wire.delta) {
        for (int64_t r = 0; r < escapes; ++r) {
          const int64_t multiplier = r < escapes - 1 ? limit : quotient - (escapes - 1) * limit;
          store<uint16_t>(codes + 2 * used, 0);
          store_field(fields + width * used, width, static_cast<uint32_t>(multiplier - 1));
          ++used;
        }
        store<uint16_t>(codes + 2 * used,
                        static_cast<uint16_t>(index - previous - kEscapeStep * quotient));
      } else {
        store<int32_t>(codes + 4 * used, static_cast<int32_t>(index));
      }
      store_field(fields + width * used, width, bits);
      ++used;
      previous = index;
      if (residual != nullptr && fp8) residual[local] = finite ? value - decoded : 0.0f;
    }
    store<int32_t>(out + 4 * dct::wire::kWordCount, static_cast<int32_t>(used));
    store<int32_t>(out + 4 * dct::wire::kWordOverflow,
                   static_cast<int32_t>(cand_overflow + cut));
    return Status{};
  });
}

}  // namespace dct_cpu
