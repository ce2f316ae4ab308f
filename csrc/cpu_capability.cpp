// Which of our vector kernels this CPU may run (cpu_capability.h), decided once.
#include "cpu_capability.h"

#include <ATen/Version.h>

#include <string>

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

}  // namespace cnnlstm_ext
