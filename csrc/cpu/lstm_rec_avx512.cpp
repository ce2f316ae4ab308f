// The recurrent product (lstm_cell.h) built for AVX-512F, used where ATen's CPU capability is
// AVX512. Raw intrinsics and no ATen header, so that no inline function shared with the other
// translation units is compiled for AVX-512 here (the linker could keep that copy for all callers);
// the template below has internal linkage.
#include "lstm_cell.h"

#ifdef CNNLSTM_EXT_X86_SIMD

#include <immintrin.h>  // before the pragma, with the compiler's own macros

#pragma GCC push_options
#pragma GCC target("avx512f,fma")

namespace cnnlstm_ext {
namespace cell_avx512 {
namespace {

constexpr int64_t kRows = 4;

// One tile: kRows rows x kBlocks blocks of 16 columns, all in registers (8 accumulators for
// two blocks); per j, one load of w per block and one broadcast of a per row.
//   ar: the tile's kRows rows of a (zeros past nr), w: the first block's [J, 16],
//   out: the tile's first output element, row stride C.
template <int kBlocks>
inline void tile(const float* const* ar, const float* w, int64_t J, float* out, int64_t C,
                 int64_t nr) {
  __m512 acc[kRows][kBlocks];
  for (int r = 0; r < kRows; ++r)
    for (int b = 0; b < kBlocks; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    __m512 wv[kBlocks];
    for (int b = 0; b < kBlocks; ++b)
      wv[b] = _mm512_loadu_ps(w + (b * J + j) * kRecColumns);
    for (int r = 0; r < kRows; ++r) {
      const __m512 av = _mm512_set1_ps(ar[r][j]);
      for (int b = 0; b < kBlocks; ++b) acc[r][b] = _mm512_fmadd_ps(av, wv[b], acc[r][b]);
    }
  }
  for (int r = 0; r < kRows; ++r) {  // r constant after unrolling: acc stays in registers
    if (r >= nr) break;
    for (int b = 0; b < kBlocks; ++b) _mm512_storeu_ps(out + r * C + b * kRecColumns, acc[r][b]);
  }
}

}  // namespace

// Columns in pairs of blocks (a single block for an odd one at the end), rows in groups of 4; the
// pair's w (256 KiB at J = 2048) stays in L2 for the next row group. 1.1x to 1.17x the AVX2
// kernel's rate on an AMD EPYC (Zen 4, where a 512-bit FMA takes both 256-bit units): about
// 113 GFLOP/s on one core, for half as many loads and broadcasts per FMA.
void recurrent_product(const float* a, const float* w, float* out, int64_t B, int64_t J,
                       int64_t C, int64_t c0, int64_t c1, const float* zeros) {
  for (int64_t n0 = c0; n0 < c1; n0 += 2 * kRecColumns) {
    const bool pair = n0 + 2 * kRecColumns <= c1;
    for (int64_t r0 = 0; r0 < B; r0 += kRows) {
      const int64_t nr = B - r0 < kRows ? B - r0 : kRows;
      const float* ar[kRows];
      for (int64_t r = 0; r < kRows; ++r) ar[r] = r < nr ? a + (r0 + r) * J : zeros;
      if (pair)
        tile<2>(ar, w + n0 * J, J, out + r0 * C + n0, C, nr);
      else
        tile<1>(ar, w + n0 * J, J, out + r0 * C + n0, C, nr);
    }
  }
}

}  // namespace cell_avx512
}  // namespace cnnlstm_ext

#pragma GCC pop_options

#endif  // CNNLSTM_EXT_X86_SIMD
