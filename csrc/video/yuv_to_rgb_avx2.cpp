// yuv_to_rgb's row kernels built for AVX2/FMA (used only where the CPU has them). The headers come
// first, outside the pragma, so that no inline function shared with the other translation units
// is compiled for AVX2 (the linker could keep that copy for all callers).
#include "cpu_capability.h"
#include "video/yuv_to_rgb.h"

#ifdef CNNLSTM_EXT_X86_SIMD

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CNNLSTM_VIDEO_NS isa_avx2
#include "video/yuv_to_rgb_impl.h"
#undef CNNLSTM_VIDEO_NS
#pragma GCC pop_options

#endif
