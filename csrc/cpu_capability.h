// Which of our vector kernels this CPU may run, decided once at run time.
#pragma once

// x86-64 with GCC or Clang: the AVX2/FMA and AVX-512 kernels are compiled, each instruction set
// in translation units of its own built under `#pragma GCC target` (setuptools gives every source
// the same flags), and each op's table of kernels is filled once from the functions below
// (lstm/lstm_cpu_cell.h, pooling/pooling_cpu_kernels.h).
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define CNNLSTM_EXT_X86_SIMD 1
#endif

namespace cnnlstm_ext {

// ATen's capability ("DEFAULT", "AVX2", "AVX512"), which ATEN_CPU_CAPABILITY=default or avx2
// lowers, confirmed by the CPU itself in case ATen was built without that set's kernels. Always
// false where CNNLSTM_EXT_X86_SIMD is not defined.
bool cpu_has_avx2();     // AVX2 and FMA
bool cpu_has_avx512();   // and AVX-512F
bool cpu_has_avx512_bf16();  // and AVX512-BF16
// And AMX-BF16, granted to this process by the kernel (at::cpu::init_amx), unless oneDNN's own
// ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) names an instruction set without AMX: the variable
// that takes AMX away from nn.LSTM's oneDNN kernels takes it from ours too.
bool cpu_has_amx_bf16();

}  // namespace cnnlstm_ext
