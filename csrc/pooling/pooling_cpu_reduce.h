// Vectorised reductions shared by the CPU pooling kernels (frame_pool_cpu.cpp, temporal_pool_cpu.cpp).
// Inputs are float32/float64/bfloat16/float16; sums run in the accumulation type acc_t<T> (float,
// or double for double inputs). They reduce the rows of a strided matrix, column by column (the
// h*w rows of a frame of channels_last maps, the time steps of [T, B, D]); columns are contiguous,
// rows are `row_stride` elements apart, and rows are read in order.
// float32, bfloat16 and float16 inputs take the vector kernels of pooling_cpu_kernels.h where the
// CPU has them: this file is built for the baseline x86-64, where at::vec's loops summed rows at a
// fifth of the memory rate. Otherwise sums and dot products use at::vec, and the maximum is a
// branch-free loop over columns that the compiler vectorises. Maxima follow torch.max: NaN wins, and the
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

#include "pooling/pooling_cpu_kernels.h"

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

// out[c] = sum_r p[r * row_stride + c] for c in [0, n), r in [0, rows). Row after row, so that
// memory is read in order (summing column blocks over all rows in registers reads rows
// row_stride apart and was slower).
template <typename T>
inline void sum_rows(const T* p, int64_t row_stride, int64_t rows, int64_t n, acc_t<T>* out) {
  if constexpr (kVectorKernelInput<T>) {
    if (const auto kernel = pooling_cpu_kernels<T>().sum_rows) return kernel(p, row_stride, rows, n, out);
  }
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
  if constexpr (kVectorKernelInput<T>) {
    if (const auto kernel = pooling_cpu_kernels<T>().weighted_sum_rows) return kernel(p, row_stride, rows, weight, n, out);
  }
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
  if constexpr (kVectorKernelInput<T>) {
    if (const auto kernel = pooling_cpu_kernels<T>().max_rows) return kernel(p, row_stride, rows, n, max_value, max_index);
  }
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
  if constexpr (kVectorKernelInput<T>) {
    if (const auto kernel = pooling_cpu_kernels<T>().dot) return kernel(p, w, n);
  }
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
