// Device helpers shared by the kernels: magnitude keys, exact conversions, the wire's
// saturating cast, and launch checking.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dct_cuda.h"

namespace dct {

// A failed CUDA call or launch, or an op refusing its scratch, as a Status naming it.
inline Status cuda_failure(cudaError_t error, const char* where) {
  Status status;
  status.code = static_cast<int>(error);
  status.where = where;
  return status;
}

// Returns the failure of the last launch (or CUDA call) as a Status naming it.
#define DCT_CHECK(where, call)                                            \
  do {                                                                    \
    cudaError_t dct_err_ = (call);                                        \
    if (dct_err_ != cudaSuccess) return ::dct::cuda_failure(dct_err_, where); \
  } while (0)
#define DCT_CHECK_LAUNCH(where) DCT_CHECK(where, cudaGetLastError())

// Rejects an argument before any CUDA call: `what` names the op and the argument.
inline Status invalid_argument(const char* what) {
  Status status = cuda_failure(cudaErrorInvalidValue, what);
  status.bad_argument = true;
  return status;
}
#define DCT_REQUIRE(condition, what)                     \
  do {                                                   \
    if (!(condition)) return ::dct::invalid_argument(what); \
  } while (0)

using bf16 = __nv_bfloat16;

// Magnitude keys: |v|'s bit pattern with every NaN mapped to the largest key, so integer order
// is torch.topk(x.abs()) order (NaN > +inf > finite, -0 == +0).
template <typename T> struct KeyTraits;
template <> struct KeyTraits<float> {
  static constexpr uint32_t kAbsMask = 0x7FFFFFFFu, kInf = 0x7F800000u;
  static constexpr int kBits = 31;
};
template <> struct KeyTraits<__half> {
  static constexpr uint32_t kAbsMask = 0x7FFFu, kInf = 0x7C00u;
  static constexpr int kBits = 15;
};
template <> struct KeyTraits<bf16> {
  static constexpr uint32_t kAbsMask = 0x7FFFu, kInf = 0x7F80u;
  static constexpr int kBits = 15;
};

__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(bf16 v) { return __bfloat16_as_ushort(v); }

template <typename T>
__device__ __forceinline__ uint32_t magnitude_key(T v) {
  uint32_t b = bits_of(v) & KeyTraits<T>::kAbsMask;
  return b > KeyTraits<T>::kInf ? KeyTraits<T>::kAbsMask : b;
}

// Key of an fp32 threshold for |acc| >= t; a negative (non-NaN) threshold keeps everything.
__device__ __forceinline__ uint32_t threshold_key(float t) {
  uint32_t key = magnitude_key(t);
  bool negative = (__float_as_int(t) < 0) && key != 0x7FFFFFFFu;
  return negative ? 0u : key;
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(bf16 v) {
  return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(v)) << 16);
}

// fp32 -> T rounding to nearest even (what torch's .to(dtype) does); NaN to the canonical NaN.
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return v != v ? __ushort_as_half(0x7E00) : __float2half_rn(v);
}
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
  uint32_t u = __float_as_uint(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return __ushort_as_bfloat16(0x7FC0);
  return __ushort_as_bfloat16(static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16));
}

// A value stored into a dense output (decompress, decompress_many, decompress_rows): from_f32,
// with a NaN made the canonical quiet NaN in fp32 too, as the torch reference and the cpu core
// write it (CUDA's arithmetic gives 0x7FFFFFFF, and a wire NaN's payload would pass through).
template <typename O> __device__ __forceinline__ O to_out(float v) {
  return from_f32<O>(v != v ? __uint_as_float(0x7FC00000u) : v);
}

// The wire cast: finite values saturate at T's largest finite value, inf passes, every NaN
// becomes the canonical quiet NaN (so every backend writes the same bytes).
template <typename T> __device__ __forceinline__ T to_wire(float v);
template <> __device__ __forceinline__ float to_wire<float>(float v) {
  return v != v ? __uint_as_float(0x7FC00000u) : v;
}
template <> __device__ __forceinline__ __half to_wire<__half>(float v) {
  if (isfinite(v)) v = fminf(fmaxf(v, -65504.0f), 65504.0f);
  return from_f32<__half>(v);
}
template <> __device__ __forceinline__ bf16 to_wire<bf16>(float v) {
  const float limit = 3.3895313892515355e38f;  // largest finite bf16
  if (isfinite(v)) v = fminf(fmaxf(v, -limit), limit);
  return from_f32<bf16>(v);
}

// N consecutive elements moved as one aligned vector access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

__host__ __device__ inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Lays out an op's scratch pieces one after another in its workspace, each starting on a
// 256-byte boundary as a cudaMalloc'd buffer does (so any vector access suits every piece).
// A size query passes a null base and ignores the pieces.
class WorkspaceLayout {
 public:
  explicit WorkspaceLayout(void* base) : base_(reinterpret_cast<uintptr_t>(base)) {}

  // The next piece: `count` elements of T.
  template <typename T>
  T* take(size_t count) {
    T* piece = reinterpret_cast<T*>(base_ + bytes_);
    bytes_ += (sizeof(T) * count + 255) / 256 * 256;
    return piece;
  }

  // The bytes of all the pieces taken so far.
  size_t bytes() const { return bytes_; }

 private:
  uintptr_t base_;
  size_t bytes_ = 0;
};

// Calls f (returning a Status) with the C++ element type of a dtype code; an unknown code is
// an error, never read as fp32 (the entry points reject it before this is reached).
template <typename F>
Status dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(bf16{});
  }
  return invalid_argument("unknown dtype code");
}

// dispatch_float for two codes at once (an op's input and output types): f(A{}, B{}).
template <typename F>
Status dispatch_float2(DType a, DType b, F&& f) {
  return dispatch_float(a, [&](auto ta) {
    return dispatch_float(b, [&](auto tb) { return f(ta, tb); });
  });
}

}  // namespace dct
