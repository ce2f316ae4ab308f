// LSTM cell updates built for AVX-512 (used only where ATen's CPU capability is AVX512; see
// lstm_cpu_cell.h): 16 float32 lanes where the AVX2 build has 8. Built as the AVX2 variant is
// (lstm_cpu_cell_avx2.cpp): the shared headers first, outside the pragma, then the kernels in
// capability-named namespaces (at::vec::AVX512, isa_avx512). The instruction sets are those
// ATen's own AVX512 kernels are built with.
#include "lstm/lstm_cpu_cell.h"

#ifdef CNNLSTM_EXT_X86_SIMD

// Sleef declares its AVX-512 functions only where __AVX512F__ is defined, which the pragma below
// does not do; ATen's headers include it, so it comes first, with it defined for it alone.
#include <x86intrin.h>  // first, with the compiler's own macros
#if !defined(__AVX512F__)
#define __AVX__ 1
#define __AVX2__ 1
#define __AVX512F__ 1
#include <sleef.h>
#undef __AVX512F__
#undef __AVX2__
#undef __AVX__
#endif

#include <ATen/NumericUtils.h>
#include <ATen/cpu/vec/intrinsics.h>
#include <ATen/native/Math.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define CNNLSTM_CELL_NS isa_avx512
#include "lstm/lstm_cpu_cell_impl.h"
#pragma GCC pop_options

#endif  // CNNLSTM_EXT_X86_SIMD
