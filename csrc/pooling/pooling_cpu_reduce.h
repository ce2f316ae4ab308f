// Vectorised reductions shared by the CPU pooling kernels (frame_pool.cpp, temporal_pool.cpp).
// Inputs are float32/float64/bfloat16/float16; sums run in the accumulation type acc_t<T> (float,
// or double for double inputs). They reduce the rows of a strided matrix, column by column (the
// h*w rows of a frame of channels_last maps, the time steps of [T, B, D]); columns are contiguous,
// rows are `row_stride` elements apart, and rows are read in order.
// float32, bfloat16 and float16 inputs take the AVX2 versions (namespace avx2) where the CPU has
// it: this file is built for the baseline x86-64, where at::vec's loops summed rows at a fifth of
// the memory rate. Otherwise sums and dot products use at::vec, and the maximum is a branch-free
// loop over columns that the compiler vectorises. Maxima follow torch.max: NaN wins, and the
// first index of the maximum is reported.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu_capability.h"

#ifdef CNNLSTM_EXT_X86_SIMD
#include <immintrin.h>
#endif

namespace cnnlstm_ext::pooling {

template <typename T>
using acc_t = at::opmath_type<T>;

template <typename T>
using AccVec = at::vec::Vectorized<acc_t<T>>;

// Loads AccVec<T>::size() elements from p, converted to the accumulation type.
template <typename T>
inline AccVec<T> load_acc(const T* p) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return AccVec<T>::loadu(p);
  } else {
    at::vec::Vectorized<float> v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

template <typename A>
inline A horizontal_sum(const at::vec::Vectorized<A>& v) {
  alignas(64) A lanes[at::vec::Vectorized<A>::size()];
  v.store(lanes);
  A s = 0;
  for (int i = 0; i < at::vec::Vectorized<A>::size(); ++i) s += lanes[i];
  return s;
}

// True where v should replace the running maximum m: larger, or the first NaN. Branch-free.
template <typename A>
inline bool replaces_max(A v, A m) {
  return (v > m) | ((v != v) & (m == m));
}

#ifdef CNNLSTM_EXT_X86_SIMD
// The input dtypes with AVX2 kernels.
template <typename T>
constexpr bool kAvx2Input =
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

namespace avx2 {

// 8 elements from p as float32.
template <typename T>
CNNLSTM_EXT_AVX2 inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // the upper half of a float32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// The running maximum of 8 lanes, m, and the index of its element, mi, updated with v, whose
// elements have indices vi: where v is larger, or the first NaN, as replaces_max (where m is not
// NaN, !(v <= m) is v > m or v NaN).
CNNLSTM_EXT_AVX2 inline void update_max8(__m256 v, __m256i vi, __m256& m, __m256i& mi) {
  const __m256 take = _mm256_and_ps(_mm256_cmp_ps(v, m, _CMP_NLE_UQ), _mm256_cmp_ps(m, m, _CMP_ORD_Q));
  m = _mm256_blendv_ps(m, v, take);
  mi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(mi), _mm256_castsi256_ps(vi), take));
}

// As the portable functions below. The running results stay in L1 while the rows stream through
// one at a time (holding column blocks in registers over all rows, or reading two rows at once,
// was slower).
template <typename T>
CNNLSTM_EXT_AVX2 void sum_rows(const T* p, int64_t row_stride, int64_t rows, int64_t n, float* out) {
  const int64_t n_vec = n - n % 8;
  for (int64_t c = 0; c < n; ++c) out[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * row_stride;
    for (int64_t c = 0; c < n_vec; c += 8)
      _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_loadu_ps(out + c), load8(row + c)));
    for (int64_t c = n_vec; c < n; ++c) out[c] += static_cast<float>(row[c]);
  }
}

template <typename T>
CNNLSTM_EXT_AVX2 void weighted_sum_rows(const T* p, int64_t row_stride, int64_t rows, const float* weight,
                                        int64_t n, float* out) {
  const int64_t n_vec = n - n % 8;
  for (int64_t c = 0; c < n; ++c) out[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * row_stride;
    const __m256 w = _mm256_set1_ps(weight[r]);
    for (int64_t c = 0; c < n_vec; c += 8)
      _mm256_storeu_ps(out + c, _mm256_fmadd_ps(w, load8(row + c), _mm256_loadu_ps(out + c)));
    for (int64_t c = n_vec; c < n; ++c) out[c] += weight[r] * static_cast<float>(row[c]);
  }
}

template <typename T>
CNNLSTM_EXT_AVX2 void max_rows(const T* p, int64_t row_stride, int64_t rows, int64_t n, float* max_value,
                               int32_t* max_index) {
  const int64_t n_vec = n - n % 8;
  for (int64_t c = 0; c < n; ++c) {
    max_value[c] = static_cast<float>(p[c]);
    max_index[c] = 0;
  }
  for (int64_t r = 1; r < rows; ++r) {
    const T* row = p + r * row_stride;
    const __m256i ri = _mm256_set1_epi32(static_cast<int32_t>(r));
    for (int64_t c = 0; c < n_vec; c += 8) {
      __m256 m = _mm256_loadu_ps(max_value + c);
      __m256i mi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(max_index + c));
      update_max8(load8(row + c), ri, m, mi);
      _mm256_storeu_ps(max_value + c, m);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(max_index + c), mi);
    }
    for (int64_t c = n_vec; c < n; ++c) {
      const float v = static_cast<float>(row[c]);
      const bool take = replaces_max(v, max_value[c]);
      max_value[c] = take ? v : max_value[c];
      max_index[c] = take ? static_cast<int32_t>(r) : max_index[c];
    }
  }
}

template <typename T>
CNNLSTM_EXT_AVX2 float dot(const T* p, const float* w, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains of FMAs in flight
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    acc0 = _mm256_fmadd_ps(load8(p + c), _mm256_loadu_ps(w + c), acc0);
    acc1 = _mm256_fmadd_ps(load8(p + c + 8), _mm256_loadu_ps(w + c + 8), acc1);
  }
  for (; c + 8 <= n; c += 8) acc0 = _mm256_fmadd_ps(load8(p + c), _mm256_loadu_ps(w + c), acc0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  float s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  for (; c < n; ++c) s += static_cast<float>(p[c]) * w[c];
  return s;
}

}  // namespace avx2

// A statement: returns the AVX2 version of a reduction where T has one and the CPU has AVX2 (the
// portable loop follows it).
#define CNNLSTM_EXT_REDUCE_AVX2(T, CALL)   \
  if constexpr (kAvx2Input<T>) {           \
    if (cpu_has_avx2()) return avx2::CALL; \
  }
#else
#define CNNLSTM_EXT_REDUCE_AVX2(T, CALL)
#endif  // CNNLSTM_EXT_X86_SIMD

// out[c] = sum_r p[r * row_stride + c] for c in [0, n), r in [0, rows). Row after row, so that
// memory is read in order (summing column blocks over all rows in registers reads rows
// row_stride apart and was slower).
template <typename T>
inline void sum_rows(const T* p, int64_t row_stride, int64_t rows, int64_t n, acc_t<T>* out) {
  CNNLSTM_EXT_REDUCE_AVX2(T, sum_rows(p, row_stride, rows, n, out))
  using Vec = AccVec<T>;
  constexpr int64_t kV = Vec::size();
  for (int64_t c = 0; c < n; ++c) out[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * row_stride;
    int64_t c = 0;
    for (; c + kV <= n; c += kV) (Vec::loadu(out + c) + load_acc(row + c)).store(out + c);
    for (; c < n; ++c) out[c] += static_cast<acc_t<T>>(row[c]);
  }
}

// out[c] = sum_r weight[r] * p[r * row_stride + c]
template <typename T>
inline void weighted_sum_rows(const T* p, int64_t row_stride, int64_t rows, const acc_t<T>* weight,
                              int64_t n, acc_t<T>* out) {
  CNNLSTM_EXT_REDUCE_AVX2(T, weighted_sum_rows(p, row_stride, rows, weight, n, out))
  using Vec = AccVec<T>;
  constexpr int64_t kV = Vec::size();
  for (int64_t c = 0; c < n; ++c) out[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * row_stride;
    const Vec w(weight[r]);
    int64_t c = 0;
    for (; c + kV <= n; c += kV) at::vec::fmadd(w, load_acc(row + c), Vec::loadu(out + c)).store(out + c);
    for (; c < n; ++c) out[c] += weight[r] * static_cast<acc_t<T>>(row[c]);
  }
}

// max_value[c], max_index[c] = max and first argmax over r of p[r * row_stride + c] (rows >= 1).
// Branch-free per column, so the compiler vectorises the column loop.
template <typename T>
inline void max_rows(const T* p, int64_t row_stride, int64_t rows, int64_t n, acc_t<T>* max_value,
                     int32_t* max_index) {
  CNNLSTM_EXT_REDUCE_AVX2(T, max_rows(p, row_stride, rows, n, max_value, max_index))
  using A = acc_t<T>;
  for (int64_t c = 0; c < n; ++c) {
    max_value[c] = static_cast<A>(p[c]);
    max_index[c] = 0;
  }
  for (int64_t r = 1; r < rows; ++r) {
    const T* row = p + r * row_stride;
    const int32_t ri = static_cast<int32_t>(r);
    for (int64_t c = 0; c < n; ++c) {
      const A v = static_cast<A>(row[c]);
      const A m = max_value[c];
      const bool take = replaces_max(v, m);
      max_value[c] = take ? v : m;
      max_index[c] = take ? ri : max_index[c];
    }
  }
}

// sum_c p[c] * w[c]
template <typename T>
inline acc_t<T> dot(const T* p, const acc_t<T>* w, int64_t n) {
  CNNLSTM_EXT_REDUCE_AVX2(T, dot(p, w, n))
  using Vec = AccVec<T>;
  constexpr int64_t kV = Vec::size();
  Vec acc(0);
  int64_t c = 0;
  for (; c + kV <= n; c += kV) acc = at::vec::fmadd(load_acc(p + c), Vec::loadu(w + c), acc);
  acc_t<T> s = horizontal_sum(acc);
  for (; c < n; ++c) s += static_cast<acc_t<T>>(p[c]) * w[c];
  return s;
}

}  // namespace cnnlstm_ext::pooling
