// The recurrent product (lstm_cpu_cell.h) built for AVX-512F, used where ATen's CPU capability is
// AVX512, and its bfloat16 variant for AVX512-BF16. Raw intrinsics and no ATen header, so that no
// inline function shared with the other translation units is compiled for AVX-512 here (the
// linker could keep that copy for all callers); the templates below have internal linkage.
#include "lstm/lstm_cpu_cell.h"

#ifdef CNNLSTM_EXT_X86_SIMD

#include <immintrin.h>  // before the pragma, with the compiler's own macros

#pragma GCC push_options
#pragma GCC target("avx512f,fma")

namespace cnnlstm_ext::lstm {
namespace isa_avx512 {
namespace {

// One tile: kR rows x kBlocks blocks of 16 columns, all in registers (up to 16 accumulators);
// per j, one load of w per block (a cache line, from L2: a pair's w is larger than L1) and one
// broadcast of a per row. Up to 8 rows, so that each line of w loaded serves 8 FMAs per block:
// with 4 rows the loads of w, not the FMAs, set the pace at B >= 8. The last row group takes a
// tile of just its rows, so that a small batch computes no rows of zeros.
//   ar: the tile's kR rows of a, w: the first block's [J, 16], out: the tile's first output
//   element, row stride C, of which nr rows are stored.
template <int kR, int kBlocks>
void tile(const float* const* ar, const float* w, int64_t J, float* out, int64_t C, int64_t nr) {
  __m512 acc[kR][kBlocks];
  for (int r = 0; r < kR; ++r)
    for (int b = 0; b < kBlocks; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    __m512 wv[kBlocks];
    for (int b = 0; b < kBlocks; ++b)
      wv[b] = _mm512_loadu_ps(w + (b * J + j) * kRecColumns);
    for (int r = 0; r < kR; ++r) {
      const __m512 av = _mm512_set1_ps(ar[r][j]);
      for (int b = 0; b < kBlocks; ++b) acc[r][b] = _mm512_fmadd_ps(av, wv[b], acc[r][b]);
    }
  }
  for (int r = 0; r < kR; ++r) {  // r constant after unrolling: acc stays in registers
    if (r >= nr) break;
    for (int b = 0; b < kBlocks; ++b) _mm512_storeu_ps(out + r * C + b * kRecColumns, acc[r][b]);
  }
}

using Tile = void (*)(const float* const*, const float*, int64_t, float*, int64_t, int64_t);
// [rows - 1][blocks - 1]
constexpr Tile kTiles[8][2] = {
    {&tile<1, 1>, &tile<1, 2>}, {&tile<2, 1>, &tile<2, 2>}, {&tile<3, 1>, &tile<3, 2>},
    {&tile<4, 1>, &tile<4, 2>}, {&tile<5, 1>, &tile<5, 2>}, {&tile<6, 1>, &tile<6, 2>},
    {&tile<7, 1>, &tile<7, 2>}, {&tile<8, 1>, &tile<8, 2>}};

}  // namespace

// Columns in pairs of blocks (a single block for an odd one at the end), rows in groups of 8; the
// pair's w (64 KiB at J = 512, 256 KiB at J = 2048) stays in L2 for the next row group. About
// 112 GFLOP/s on one core of an AMD EPYC (Zen 4, where a 512-bit FMA takes both 256-bit units)
// from B = 8, the FMA rate; at B = 1 the tile of one row is 1.5x faster than one padded to 4 rows.
// Three rows take the tile of four (its fourth row repeats the first and is not stored): GCC's
// three-row tile ran 1.5x slower.
// (Summing j in chunks that keep the pair's w in L1 across row groups was 6-10% slower.)
void recurrent_product(const float* a, const float* w, float* out, int64_t B, int64_t J,
                       int64_t C, int64_t c0, int64_t c1, const float* /*zeros*/) {
  for (int64_t n0 = c0; n0 < c1; n0 += 2 * kRecColumns) {
    const int pair = n0 + 2 * kRecColumns <= c1 ? 1 : 0;
    for (int64_t r0 = 0; r0 < B; r0 += 8) {
      const int64_t nr = B - r0 < 8 ? B - r0 : 8;
      const int64_t rows = nr == 3 ? 4 : nr;
      const float* ar[8];
      for (int64_t r = 0; r < rows; ++r) ar[r] = a + (r0 + (r < nr ? r : 0)) * J;  // (as bf16)
      kTiles[rows - 1][pair](ar, w + n0 * J, J, out + r0 * C + n0, C, nr);
    }
  }
}

// --- The product with the batch in the vector lanes (float32, from kBtRows rows) ---------------
// A tile holds 32 rows x kN columns as kN pairs of vectors of rows: per j, two loads of a^T (the
// 32 rows of unit j) and, per column, one broadcast of w for two FMAs. The row tiles above load
// a line of w (from L2: a pair's w is larger than L1) for every 8 FMAs and their rows re-read it
// for each group of 8 rows; here each w is read once per 32 rows. One step of one direction at
// H = 512, B = 32, on one core of the Intel Xeon of benchmarks/RESULTS.md: 1.2-1.4x the row tiles
// (77 -> 93 and 112 -> 141 GFLOP/s at two clock rates). At 16 rows a broadcast feeds one FMA:
// slower than the row tiles.
namespace {

// The tiles of a group of kBtColumns columns: 28 accumulators, then 16 (28 + 2 + 1 registers).
constexpr int kBtTiles[] = {14, 14, 14, 14, 8};
// recurrent_product_bt has a tile_bt for these widths only, and the tiles fill the group.
constexpr bool bt_tiles_fill_group() {
  int64_t columns = 0;
  for (const int n : kBtTiles) {
    if (n != 14 && n != 8) return false;
    columns += n;
  }
  return columns == kBtColumns;
}
static_assert(bt_tiles_fill_group(), "kBtTiles: widths 14 or 8, kBtColumns in all");

//   aT: the tile's first row of a^T [J, ldb], w: the tile's [J, kN], part: [kN, 32].
template <int kN>
void tile_bt(const float* aT, int64_t ldb, const float* w, int64_t J, float* part) {
  __m512 acc[kN][2];
  for (int n = 0; n < kN; ++n) acc[n][0] = acc[n][1] = _mm512_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    const __m512 a0 = _mm512_loadu_ps(aT + j * ldb), a1 = _mm512_loadu_ps(aT + j * ldb + 16);
    for (int n = 0; n < kN; ++n) {
      const __m512 wv = _mm512_set1_ps(w[j * kN + n]);
      acc[n][0] = _mm512_fmadd_ps(wv, a0, acc[n][0]);
      acc[n][1] = _mm512_fmadd_ps(wv, a1, acc[n][1]);
    }
  }
  for (int n = 0; n < kN; ++n) {
    _mm512_storeu_ps(part + n * kBtRows, acc[n][0]);
    _mm512_storeu_ps(part + n * kBtRows + 16, acc[n][1]);
  }
}

// r[i][k] -> r[k][i]: pairs of rows interleaved, then quads, then 128-bit lanes twice.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4q + c], lane L: rows 4q .. 4q + 3 of column 4L + c.
  __m512 u[16];
  for (int q = 0; q < 16; q += 4) {
    u[q] = _mm512_shuffle_ps(t[q], t[q + 2], 0x44);
    u[q + 1] = _mm512_shuffle_ps(t[q], t[q + 2], 0xEE);
    u[q + 2] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0x44);
    u[q + 3] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 even01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);  // lanes 0, 2 of quads 0, 1
    const __m512 odd01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 even23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(even01, even23, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(even01, even23, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0xDD);
  }
}

}  // namespace

void recurrent_product_bt(const float* aT, int64_t ldb, const float* w, float* out, int64_t B,
                          int64_t J, int64_t C, int64_t c0, int64_t c1) {
  alignas(64) float part[kBtColumns * kBtRows];  // [64 columns, 32 rows] of one group
  for (int64_t q = c0; q < c1; q += kBtColumns) {
    for (int64_t r0 = 0; r0 < B; r0 += kBtRows) {
      const float* wt = w + q * J;
      float* pt = part;
      for (const int n : kBtTiles) {
        if (n == 14) tile_bt<14>(aT + r0, ldb, wt, J, pt);
        else tile_bt<8>(aT + r0, ldb, wt, J, pt);
        wt += n * J;
        pt += n * kBtRows;
      }
      // part -> out rows r0 .. r0 + nr - 1, columns q .. q + 63, by blocks of 16 x 16
      const int64_t nr = B - r0 < kBtRows ? B - r0 : kBtRows;
      for (int64_t cb = 0; cb < kBtColumns; cb += 16)
        for (int64_t rb = 0; rb < nr; rb += 16) {
          __m512 v[16];
          for (int i = 0; i < 16; ++i) v[i] = _mm512_load_ps(part + (cb + i) * kBtRows + rb);
          transpose16x16(v);
          for (int64_t k = 0; k < 16 && rb + k < nr; ++k)
            _mm512_storeu_ps(out + (r0 + rb + k) * C + q + cb, v[k]);
        }
    }
  }
}

void to_bt(const float* a, int64_t B, int64_t J, float* aT, int64_t ldb) {
  for (int64_t b0 = 0; b0 < ldb; b0 += 16)
    for (int64_t j0 = 0; j0 < J; j0 += 16) {
      __m512 v[16];
      for (int64_t i = 0; i < 16; ++i)
        v[i] = b0 + i < B ? _mm512_loadu_ps(a + (b0 + i) * J + j0) : _mm512_setzero_ps();
      transpose16x16(v);
      for (int64_t k = 0; k < 16; ++k) _mm512_storeu_ps(aT + (j0 + k) * ldb + b0, v[k]);
    }
}

void pack_bt_group(const float* w, int64_t J, float* packed) {
  for (const int n : kBtTiles) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t j0 = 0; j0 < J; j0 += 16) {
      __m512 v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = i < n ? _mm512_loadu_ps(w + i * J + j0) : _mm512_setzero_ps();
      transpose16x16(v);
      for (int64_t k = 0; k < 16; ++k) _mm512_mask_storeu_ps(packed + (j0 + k) * n, lanes, v[k]);
    }
    w += n * J;
    packed += n * J;
  }
}

}  // namespace isa_avx512
}  // namespace cnnlstm_ext::lstm

#pragma GCC pop_options

// The bfloat16 product: vdpbf16ps adds the products of a pair (j, j + 1) of bfloat16 values to
// each float32 lane, twice the multiply-adds of an FMA per instruction. The same tiles, with a
// pair of a broadcast as one 32-bit word and w packed so that a vector holds the pairs of 16
// columns.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16")

namespace cnnlstm_ext::lstm {
namespace isa_avx512 {
namespace {

// Up to 8 rows per tile (16 accumulators for two blocks): each w vector loaded serves 16
// multiply-adds of pairs. The last row group takes a tile of just its rows, so that a small
// batch computes no rows of zeros (three rows: the tile of four, as for float32).
//   ar: the tile's kR rows of a as pairs, w: the first block's [J / 2, 16, 2],
//   out: the tile's first output element, row stride C, of which nr rows are stored.
template <int kR, int kBlocks>
void tile_bf16(const uint32_t* const* ar, const uint16_t* w, int64_t pairs, float* out,
               int64_t C, int64_t nr) {
  __m512 acc[kR][kBlocks];
  for (int r = 0; r < kR; ++r)
    for (int b = 0; b < kBlocks; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[kBlocks];
    for (int b = 0; b < kBlocks; ++b)
      wv[b] = (__m512bh)_mm512_loadu_si512(w + (b * pairs + p) * 2 * kRecColumns);
    for (int r = 0; r < kR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ar[r][p]));
      for (int b = 0; b < kBlocks; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], av, wv[b]);
    }
  }
  for (int r = 0; r < kR; ++r) {
    if (r >= nr) break;
    for (int b = 0; b < kBlocks; ++b) _mm512_storeu_ps(out + r * C + b * kRecColumns, acc[r][b]);
  }
}

using TileBf16 = void (*)(const uint32_t* const*, const uint16_t*, int64_t, float*, int64_t,
                          int64_t);
// [rows - 1][blocks - 1]
constexpr TileBf16 kTilesBf16[8][2] = {
    {&tile_bf16<1, 1>, &tile_bf16<1, 2>}, {&tile_bf16<2, 1>, &tile_bf16<2, 2>},
    {&tile_bf16<3, 1>, &tile_bf16<3, 2>}, {&tile_bf16<4, 1>, &tile_bf16<4, 2>},
    {&tile_bf16<5, 1>, &tile_bf16<5, 2>}, {&tile_bf16<6, 1>, &tile_bf16<6, 2>},
    {&tile_bf16<7, 1>, &tile_bf16<7, 2>}, {&tile_bf16<8, 1>, &tile_bf16<8, 2>}};

}  // namespace

// Columns in pairs of blocks (a single block for an odd one at the end), rows in groups of 8.
void recurrent_product_bf16(const uint16_t* a, const uint16_t* w, float* out, int64_t B,
                            int64_t J, int64_t C, int64_t c0, int64_t c1) {
  for (int64_t n0 = c0; n0 < c1; n0 += 2 * kRecColumns) {
    const int pair = n0 + 2 * kRecColumns <= c1 ? 1 : 0;
    for (int64_t r0 = 0; r0 < B; r0 += 8) {
      const int64_t nr = B - r0 < 8 ? B - r0 : 8;
      const int64_t rows = nr == 3 ? 4 : nr;
      const uint32_t* ar[8];
      for (int64_t r = 0; r < rows; ++r)  // (a fourth row repeats the first, not stored)
        ar[r] = reinterpret_cast<const uint32_t*>(a + (r0 + (r < nr ? r : 0)) * J);
      kTilesBf16[rows - 1][pair](ar, w + n0 * J, J / 2, out + r0 * C + n0, C, nr);
    }
  }
}

void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, (__m512i)v);
  }
  if (i < n) {  // the last n - i < 32 elements, through a zero-padded copy
    float in[32] = {};
    uint16_t bits[32];
    for (int64_t k = i; k < n; ++k) in[k - i] = src[k];
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + 16), _mm512_loadu_ps(in));
    _mm512_storeu_si512(bits, (__m512i)v);
    for (int64_t k = i; k < n; ++k) dst[k] = bits[k - i];
  }
}

}  // namespace isa_avx512
}  // namespace cnnlstm_ext::lstm

#pragma GCC pop_options

#endif  // CNNLSTM_EXT_X86_SIMD
