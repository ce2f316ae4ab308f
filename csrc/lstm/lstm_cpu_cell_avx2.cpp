// LSTM cell kernels built for AVX2/FMA (used only where the CPU has them; see lstm_cpu_cell.h).
//
// setuptools gives every source the same flags, so the instruction set is raised here with
// `#pragma GCC target` rather than -mavx2 -mfma. Everything that is not specific to the vector
// width is included first, outside the pragma, so that no inline function shared with the other
// translation units is compiled with AVX2 (the linker could keep that copy for all callers). What
// comes after the pragma lives in capability-named namespaces (at::vec::AVX2, isa_avx2).
#include "lstm/lstm_cpu_cell.h"

#ifdef CNNLSTM_EXT_X86_SIMD

// Sleef declares its AVX/AVX2 functions only where __AVX__/__AVX2__ are defined, which the pragma
// below does not do; ATen's headers include it, so it comes first, with both defined for it alone.
#include <x86intrin.h>  // first, with the compiler's own macros
#if !defined(__AVX2__)
#define __AVX__ 1
#define __AVX2__ 1
#include <sleef.h>
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
#pragma GCC target("avx2,fma")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define CNNLSTM_CELL_NS isa_avx2
#include "lstm/lstm_cpu_cell_impl.h"
#pragma GCC pop_options

#endif  // CNNLSTM_EXT_X86_SIMD
