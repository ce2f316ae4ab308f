// The CPU pooling ops' vector kernels, one table per input type, chosen once from the CPU's
// capability (cpu_capability.h) as the LSTM's cell kernels are (lstm/lstm_cpu_cell.h): each
// instruction set's kernels live in their own translation unit built under `#pragma GCC target`
// (pooling_cpu_avx2.cpp) and fill the table; a null entry means the portable loop of
// pooling_cpu_reduce.h or frame_pool_cpu.cpp runs instead (float64, or no AVX2).
// Sums run in float32 for the types that have kernels (float32, bfloat16, float16).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu_capability.h"

namespace cnnlstm_ext::pooling {

template <typename T>
struct PoolingCpuKernels {
  // Rows of a strided matrix reduced column by column (rows are row_stride elements apart,
  // columns contiguous): out[c] = sum_r p[r, c]; with weight[r]; the maximum and the first index
  // of it (NaN wins); and a dot product sum_c p[c] * w[c].
  void (*sum_rows)(const T* p, int64_t row_stride, int64_t rows, int64_t n, float* out) = nullptr;
  void (*weighted_sum_rows)(const T* p, int64_t row_stride, int64_t rows, const float* weight,
                            int64_t n, float* out) = nullptr;
  void (*max_rows)(const T* p, int64_t row_stride, int64_t rows, int64_t n, float* max_value,
                   int32_t* max_index) = nullptr;
  float (*dot)(const T* p, const float* w, int64_t n) = nullptr;
  // One frame of contiguous maps, frame: [C, HW] -> m: [C], the sum of each plane; and the
  // maximum with its first index a: [C] (HW >= 8).
  void (*frame_sum_contiguous)(const T* frame, int64_t HW, int64_t C, float* m) = nullptr;
  void (*frame_max_contiguous)(const T* frame, int64_t HW, int64_t C, float* m,
                               int32_t* a) = nullptr;
  const char* isa = "default";
};

// True where v should replace the running maximum m: larger, or the first NaN. Branch-free.
template <typename A>
inline bool replaces_max(A v, A m) {
  return (v > m) | ((v != v) & (m == m));
}

// The input types with vector kernels.
template <typename T>
constexpr bool kVectorKernelInput =
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

#ifdef CNNLSTM_EXT_X86_SIMD
namespace isa_avx2 {
template <typename T>
PoolingCpuKernels<T> kernels();  // float, c10::BFloat16, c10::Half (pooling_cpu_avx2.cpp)
}  // namespace isa_avx2
#endif

// The best kernels this CPU runs for T (decided once).
template <typename T>
const PoolingCpuKernels<T>& pooling_cpu_kernels() {
  static const PoolingCpuKernels<T> kernels = [] {
#ifdef CNNLSTM_EXT_X86_SIMD
    if constexpr (kVectorKernelInput<T>) {
      if (cpu_has_avx2()) return isa_avx2::kernels<T>();
    }
#endif
    return PoolingCpuKernels<T>();
  }();
  return kernels;
}

}  // namespace cnnlstm_ext::pooling
