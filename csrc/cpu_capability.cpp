// Which of our vector kernels this CPU may run (cpu_capability.h), decided once.
#include "cpu_capability.h"

#include <ATen/Version.h>
#include <ATen/cpu/Utils.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
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

bool cpu_has_amx_bf16() {
#ifdef CNNLSTM_EXT_X86_SIMD
  static const bool amx = [] {
    if (!cpu_has_avx512_bf16() || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-bf16"))
      return false;
    for (const char* var : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
      const char* value = std::getenv(var);
      if (value == nullptr || *value == '\0') continue;
      std::string isa(value);
      std::transform(isa.begin(), isa.end(), isa.begin(),
                     [](unsigned char ch) { return static_cast<char>(std::toupper(ch)); });
      if (isa != "ALL" && isa != "DEFAULT" && isa.find("AMX") == std::string::npos) return false;
    }
    return at::cpu::init_amx();  // the arch_prctl request Linux wants before the first tile op
  }();
  return amx;
#else
  return false;
#endif
}

}  // namespace cnnlstm_ext
