// The bfloat16 recurrent product (lstm_cpu_cell.h) on AMX tiles, used where the CPU has AMX-BF16
// and the process may use it (cpu_has_amx_bf16). One TDPBF16PS multiplies a tile of up to 16 rows
// x 32 values of a by 32 x 16 values of w into 16 x 16 float32 sums: 8192 multiply-adds, 16 times
// the work of one AVX-512 vdpbf16ps. The packed w of the AVX-512 product,
// [C / 16, J / 2, 16, 2], is already the layout a w tile wants (16 pairs of rows of 16 columns,
// 64 bytes each). Raw intrinsics and no ATen header, as in lstm_cpu_rec_avx512.cpp.
#include "lstm/lstm_cpu_cell.h"

#ifdef CNNLSTM_EXT_X86_SIMD

#include <immintrin.h>  // before the pragma, with the compiler's own macros

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

namespace cnnlstm_ext::lstm {
namespace isa_amx {
namespace {

// The 64-byte operand of LDTILECFG (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
};

constexpr int kTileRows = 16;      // rows of a (and of the sums) per tile
constexpr int kPairsPerTile = 16;  // pairs of j per tile: 32 bfloat16 values, 64 bytes per row

// Tiles: sums 0-3 (row tiles 0 / 1 x column blocks 0 / 1), a 4-5 (row tiles), w 6-7 (blocks).
// Rows of the second row tile: m1 (0: none). The tiles of a row group are configured once.
void configure(int m0, int m1) {
  TileConfig cfg;
  const int rows[8] = {m0, m0, m1, m1, m0, m1, kPairsPerTile, kPairsPerTile};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = rows[t] ? 64 : 0;
  }
  _tile_loadconfig(&cfg);
}

// Sums of one group of up to 32 rows (two row tiles when kTwoRowTiles) by two column blocks over
// all J: a rows at stride J, w: the first block's [J / 2, 16, 2], the second block J * 16 values
// after it; out: row stride C.
template <bool kTwoRowTiles>
void group(const uint16_t* a, int64_t J, const uint16_t* w, float* out, int64_t C) {
  const int64_t a_stride = J * 2, out_stride = C * 4;
  _tile_zero(0);
  _tile_zero(1);
  if (kTwoRowTiles) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t j = 0; j < J; j += 2 * kPairsPerTile) {
    const uint16_t* wj = w + j * kRecColumns;  // pair j / 2 of the first block
    _tile_loadd(6, wj, 64);
    _tile_loadd(7, wj + J * kRecColumns, 64);
    _tile_loadd(4, a + j, a_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kTwoRowTiles) {
      _tile_loadd(5, a + kTileRows * J + j, a_stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out, out_stride);
  _tile_stored(1, out + kRecColumns, out_stride);
  if (kTwoRowTiles) {
    _tile_stored(2, out + kTileRows * C, out_stride);
    _tile_stored(3, out + kTileRows * C + kRecColumns, out_stride);
  }
}

}  // namespace

// RecurrentProductBf16Fn (lstm_cpu_cell.h): rows in groups of 32 (two tiles of 16; the last
// group's tiles hold just its rows), columns in pairs of blocks. J, c0 and c1 must be multiples
// of 32 (use_amx: H a multiple of 32, so the recurrence's slices are).
void recurrent_product_bf16(const uint16_t* a, const uint16_t* w, float* out, int64_t B,
                            int64_t J, int64_t C, int64_t c0, int64_t c1) {
  for (int64_t r0 = 0; r0 < B; r0 += 2 * kTileRows) {
    const int m0 = static_cast<int>(B - r0 < kTileRows ? B - r0 : kTileRows);
    const int m1 = static_cast<int>(B - r0 - m0 < kTileRows ? B - r0 - m0 : kTileRows);
    configure(m0, m1);
    for (int64_t n0 = c0; n0 < c1; n0 += 2 * kRecColumns) {
      float* o = out + r0 * C + n0;
      m1 > 0 ? group<true>(a + r0 * J, J, w + n0 * J, o, C)
             : group<false>(a + r0 * J, J, w + n0 * J, o, C);
    }
  }
  _tile_release();  // the tiles' state need not be kept across context switches
}

}  // namespace isa_amx
}  // namespace cnnlstm_ext::lstm

#pragma GCC pop_options

#endif  // CNNLSTM_EXT_X86_SIMD
