// LSTM cell kernels for the baseline instruction set (every CPU), and the run-time choice of
// variant.
#include <ATen/Version.h>

#include <string>

#define CNNLSTM_CELL_NS cell_default
#include "lstm_cell_impl.h"

namespace cnnlstm_ext {

bool cpu_has_avx2() {
#ifdef CNNLSTM_EXT_X86_SIMD
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#ifdef CNNLSTM_EXT_X86_SIMD
  static const bool avx512 = [] {
    return cpu_has_avx2() && at::get_cpu_capability() == "AVX512" &&
           __builtin_cpu_supports("avx512f");
  }();
  return avx512;
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#ifdef CNNLSTM_EXT_X86_SIMD
  static const bool bf16 = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return bf16;
#else
  return false;
#endif
}

template <>
LstmCellKernels<float> lstm_cell_kernels<float>() {
#ifdef CNNLSTM_EXT_X86_SIMD
  if (cpu_has_avx2()) {
    auto kernels = cell_avx2::kernels_float();
    if (cpu_has_avx512()) {
      kernels.recurrent_product = &cell_avx512::recurrent_product;
      kernels.product_isa = "avx512";
    }
    if (cpu_has_avx512_bf16()) {
      kernels.recurrent_product_bf16 = &cell_avx512::recurrent_product_bf16;
      kernels.to_bf16 = &cell_avx512::to_bf16;
    }
    return kernels;
  }
#endif
  return cell_default::kernels_float();
}

template <>
LstmCellKernels<double> lstm_cell_kernels<double>() {
#ifdef CNNLSTM_EXT_X86_SIMD
  if (cpu_has_avx2()) return cell_avx2::kernels_double();
#endif
  return cell_default::kernels_double();
}

}  // namespace cnnlstm_ext
