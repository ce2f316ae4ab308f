// Which of our vector kernels this CPU may run, decided once at run time.
#pragma once

// x86-64 with GCC or Clang: the AVX2/FMA and AVX-512 kernels are compiled (each for its own
// instruction set, via target attributes or pragmas) and chosen at run time.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define CNNLSTM_EXT_X86_SIMD 1
// A function built for AVX2, FMA and F16C, called only where cpu_has_avx2().
#define CNNLSTM_EXT_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace cnnlstm_ext {

// ATen's capability ("DEFAULT", "AVX2", "AVX512"), which ATEN_CPU_CAPABILITY=default or avx2
// lowers, confirmed by the CPU itself in case ATen was built without that set's kernels. Always
// false where CNNLSTM_EXT_X86_SIMD is not defined.
bool cpu_has_avx2();     // AVX2 and FMA
bool cpu_has_avx512();   // and AVX-512F
bool cpu_has_avx512_bf16();  // and AVX512-BF16

}  // namespace cnnlstm_ext
