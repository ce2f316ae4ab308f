// Device functions shared by the pooling kernels (frame_pool_cuda.cu, temporal_pool_cuda.cu): 16-byte vector
// access, loads and stores in a dtype chosen at run time, deterministic warp reductions, and the
// ordering that makes max pooling agree with torch.max (NaN wins, then the first index).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace cnnlstm_ext::pooling {

template <typename T>
using acc_t = at::opmath_type<T>;

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// kVec consecutive elements moved as one aligned access (16 bytes when kVec == kVec16<T>).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& v) {
  *reinterpret_cast<Pack<T, kVec>*>(p) = v;
}

inline bool is_aligned_16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// The dtypes a pooling output or incoming gradient may have, for kernels that read or write them
// through a run-time switch (a uniform branch, cheaper to compile than one kernel per dtype pair).
enum class Dtype : int { Float, Double, BFloat16, Half };

inline Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::Float;
    case at::kDouble: return Dtype::Double;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Half;
    default: TORCH_CHECK(false, "pooling: unsupported dtype ", t);
  }
}

template <typename A>
__device__ __forceinline__ void store_as(void* base, int64_t i, A v, Dtype d) {
  switch (d) {
    case Dtype::Float: static_cast<float*>(base)[i] = static_cast<float>(v); break;
    case Dtype::Double: static_cast<double*>(base)[i] = static_cast<double>(v); break;
    case Dtype::BFloat16: static_cast<c10::BFloat16*>(base)[i] = static_cast<c10::BFloat16>(v); break;
    case Dtype::Half: static_cast<c10::Half*>(base)[i] = static_cast<c10::Half>(v); break;
  }
}

template <typename A>
__device__ __forceinline__ A load_as(const void* base, int64_t i, Dtype d) {
  switch (d) {
    case Dtype::Float: return static_cast<A>(static_cast<const float*>(base)[i]);
    case Dtype::Double: return static_cast<A>(static_cast<const double*>(base)[i]);
    case Dtype::BFloat16: return static_cast<A>(static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]));
    case Dtype::Half: return static_cast<A>(static_cast<float>(static_cast<const c10::Half*>(base)[i]));
  }
  return A(0);
}

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}

// v as A (float or double); 16-bit floats go through float.
template <typename A, typename VT>
__device__ __forceinline__ A widen(VT v) {
  if constexpr (std::is_same_v<VT, c10::BFloat16> || std::is_same_v<VT, c10::Half>)
    return static_cast<A>(static_cast<float>(v));
  else
    return static_cast<A>(v);
}

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// True when value v at index i comes before value m at index j in max pooling's order: NaN first
// (the lowest index among NaNs), then the larger value, then the lower index. A total order, so a
// maximum combined from partial results in any order is the same element.
template <typename A>
__device__ __forceinline__ bool precedes(A v, int i, A m, int j) {
  const bool v_nan = v != v, m_nan = m != m;
  if (v_nan || m_nan) return v_nan && (!m_nan || i < j);
  return v > m || (v == m && i < j);
}

// "No element yet": loses to every real element under precedes().
constexpr int kNoIndex = INT_MAX;

// Sum over a warp in a fixed butterfly order (deterministic); every lane gets the result.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// NaN-propagating maximum over a warp; every lane gets the result.
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = (o > v || o != o) ? o : v;
  }
  return v;
}

// Maximum and its index over a warp, in precedes() order; every lane gets the result.
template <typename A>
__device__ __forceinline__ void warp_max_index(A& m, int& mi) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A o = __shfl_xor_sync(0xffffffffu, m, offset);
    const int oi = __shfl_xor_sync(0xffffffffu, mi, offset);
    if (precedes(o, oi, m, mi)) {
      m = o;
      mi = oi;
    }
  }
}

}  // namespace cnnlstm_ext::pooling
