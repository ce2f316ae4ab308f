// yuv_to_rgb's kernels built for AVX2/FMA (used only where the CPU has them): the row kernels,
// the same arithmetic 8 rows at a time (convert_blocked), and the half-size 4:2:0 kernel. The
// headers come first, outside the pragma, so that no inline function shared with the other
// translation units is compiled for AVX2 (the linker could keep that copy for all callers);
// immintrin.h's intrinsics carry their own targets.
#include <algorithm>
#include <vector>

#include "cpu_capability.h"
#include "video/yuv_to_rgb.h"

#ifdef CNNLSTM_EXT_X86_SIMD
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CNNLSTM_VIDEO_NS isa_avx2
#include "video/yuv_to_rgb_impl.h"
#undef CNNLSTM_VIDEO_NS

namespace cnnlstm_ext::video::isa_avx2 {
namespace {

// pshufb masks that interleave 16 R, 16 G and 16 B bytes into 48 bytes R G B R G B ...:
// mask[k][c] moves channel c's bytes to their places in output vector k (bytes 16 k .. 16 k + 15)
// and zeroes the others (0x80).
struct InterleaveMasks {
  alignas(16) uint8_t mask[3][3][16];
};

constexpr InterleaveMasks interleave_masks() {
  InterleaveMasks t{};
  for (int k = 0; k < 3; ++k)
    for (int c = 0; c < 3; ++c)
      for (int p = 0; p < 16; ++p) {
        const int byte = 16 * k + p;
        t.mask[k][c][p] = byte % 3 == c ? static_cast<uint8_t>(byte / 3) : 0x80;
      }
  return t;
}

constexpr InterleaveMasks kInterleave = interleave_masks();

// 16 values as bytes, rounded half up and clamped to [0, 255] (the saturating packs clamp).
inline __m128i to_bytes(__m256 lo, __m256 hi) {
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256i words = _mm256_packs_epi32(_mm256_cvttps_epi32(_mm256_add_ps(lo, half)),
                                           _mm256_cvttps_epi32(_mm256_add_ps(hi, half)));
  const __m256i ordered = _mm256_permute4x64_epi64(words, 0xD8);  // the packs work per lane
  return _mm_packus_epi16(_mm256_castsi256_si128(ordered), _mm256_extracti128_si256(ordered, 1));
}

// dst[c][r] = src[r][c] for an 8 x 8 block of floats (rows ld_src and ld_dst apart).
inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * ld_src);
  for (int k = 0; k < 8; k += 2) {  // per lane: r0 r1 interleaved by pairs of columns
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {  // per lane: columns of 4 rows
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {  // the two halves of each column
    _mm256_storeu_ps(dst + k * ld_dst, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * ld_dst, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
  }
}

inline int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

}  // namespace

// convert's arithmetic 8 output rows at a time: each plane's vertical sums of the 8 rows are
// transposed to [source column][8 rows], so that the horizontal taps read 8 contiguous values per
// tap (one load, one FMA) where a row at a time gathers 8 scattered ones; the results are
// transposed back to rows for the conversion.
void convert_blocked(const YuvFrame& f) {
  const int64_t w = f.width, w8 = round_up8(w), n8 = round_up8(f.W);
  struct Plane {
    const uint8_t* data;
    int64_t ld, n;
    const AreaFilter &fv, &fh;
  };
  const Plane planes[3] = {{f.y, f.ld_y, f.W, f.fvy, f.fhy}, {f.u, f.ld_u, f.Wc, f.fvc, f.fhc},
                           {f.v, f.ld_v, f.Wc, f.fvc, f.fhc}};
  std::vector<float> rows(8 * n8, 0.f);       // [8, n8]: vertical sums of 8 output rows
  std::vector<float> columns(n8 * 8, 0.f);    // [n8, 8]: the same, transposed
  std::vector<float> taps(w8 * 8, 0.f);       // [w8, 8]: after the horizontal taps
  std::vector<float> out(3 * 8 * w8, 0.f);    // [plane, 8, w8]: the same, by rows
  std::vector<uint8_t> rgb(3 * w);
  for (int64_t i0 = 0; i0 < f.height; i0 += 8) {
    const int64_t count = std::min<int64_t>(8, f.height - i0);
    for (int p = 0; p < 3; ++p) {
      const Plane& plane = planes[p];
      for (int64_t r = 0; r < 8; ++r)  // (past the last row: that row again, unused)
        vertical(plane.data, plane.ld, plane.n, plane.fv, i0 + std::min(r, count - 1),
                 rows.data() + r * n8);
      for (int64_t x = 0; x < round_up8(plane.n); x += 8)
        transpose8x8(rows.data() + x, n8, columns.data() + x * 8, 8);
      const int32_t* start = plane.fh.start.data();
      const float* weight = plane.fh.weight.data();  // tap k of output j: weight[k * w + j]
      for (int64_t j = 0; j < w; ++j) {
        const float* c = columns.data() + start[j] * 8;
        __m256 acc = _mm256_mul_ps(_mm256_broadcast_ss(weight + j), _mm256_loadu_ps(c));
        for (int64_t k = 1; k < plane.fh.taps; ++k)
          acc = _mm256_fmadd_ps(_mm256_broadcast_ss(weight + k * w + j),
                                _mm256_loadu_ps(c + 8 * k), acc);
        _mm256_storeu_ps(taps.data() + j * 8, acc);
      }
      for (int64_t j = 0; j < w8; j += 8)
        transpose8x8(taps.data() + j * 8, 8, out.data() + p * 8 * w8 + j, w8);
    }
    for (int64_t r = 0; r < count; ++r)
      convert_row(f, out.data() + r * w8, out.data() + (8 + r) * w8,
                  out.data() + (16 + r) * w8, rgb.data(), f.out + (i0 + r) * w * 3);
  }
}

// Output pixel (i, j): the mean of luma [2i, 2i + 2) x [2j, 2j + 2) (an exact integer sum, then
// a quarter), chroma sample (i, j) as it is, then the conversion: convert's arithmetic for these
// filters (the 2 x 2 mean, chroma copied), 16 pixels at a time.
void convert_half(const YuvFrame& f) {
  const int64_t w = f.width;
  const __m256i ones = _mm256_set1_epi8(1);
  const __m256 quarter = _mm256_set1_ps(0.25f), c128 = _mm256_set1_ps(128.f);
  const __m256 y0 = _mm256_set1_ps(f.y0), ys = _mm256_set1_ps(f.ys);
  const __m256 r_cr = _mm256_set1_ps(f.r_cr), g_cb = _mm256_set1_ps(f.g_cb);
  const __m256 g_cr = _mm256_set1_ps(f.g_cr), b_cb = _mm256_set1_ps(f.b_cb);
  __m128i mask[3][3];
  for (int k = 0; k < 3; ++k)
    for (int c = 0; c < 3; ++c)
      mask[k][c] = _mm_load_si128(reinterpret_cast<const __m128i*>(kInterleave.mask[k][c]));
  const auto chroma = [&](__m128i bytes, bool high) {  // 8 samples as floats, minus 128
    return _mm256_sub_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high ? _mm_srli_si128(bytes, 8) : bytes)), c128);
  };
  for (int64_t i = 0; i < f.height; ++i) {
    const uint8_t* top = f.y + 2 * i * f.ld_y;
    const uint8_t* bottom = top + f.ld_y;
    const uint8_t* u = f.u + i * f.ld_u;
    const uint8_t* v = f.v + i * f.ld_v;
    uint8_t* out = f.out + i * w * 3;
    int64_t j = 0;
    for (; j + 16 <= w; j += 16) {
      // [16] int16: the sums of the 2 x 2 blocks (maddubs adds each pair of adjacent bytes)
      const auto pairs = [&](const uint8_t* row) {
        return _mm256_maddubs_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * j)), ones);
      };
      const __m256i sums = _mm256_add_epi16(pairs(top), pairs(bottom));
      const __m128i u16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + j));
      const __m128i v16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + j));
      __m256 rgb[3][2];  // [channel][pixels 0-7, 8-15]
      for (int h = 0; h < 2; ++h) {
        const __m128i s = h ? _mm256_extracti128_si256(sums, 1) : _mm256_castsi256_si128(sums);
        const __m256 luma = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(s)), quarter);
        const __m256 l = _mm256_mul_ps(_mm256_sub_ps(luma, y0), ys);
        const __m256 cb = chroma(u16, h), cr = chroma(v16, h);
        rgb[0][h] = _mm256_add_ps(l, _mm256_mul_ps(r_cr, cr));
        rgb[1][h] = _mm256_add_ps(_mm256_add_ps(l, _mm256_mul_ps(g_cb, cb)),
                                  _mm256_mul_ps(g_cr, cr));
        rgb[2][h] = _mm256_add_ps(l, _mm256_mul_ps(b_cb, cb));
      }
      const __m128i r = to_bytes(rgb[0][0], rgb[0][1]), g = to_bytes(rgb[1][0], rgb[1][1]),
                    b = to_bytes(rgb[2][0], rgb[2][1]);
      for (int k = 0; k < 3; ++k) {
        const __m128i bytes = _mm_or_si128(
            _mm_or_si128(_mm_shuffle_epi8(r, mask[k][0]), _mm_shuffle_epi8(g, mask[k][1])),
            _mm_shuffle_epi8(b, mask[k][2]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * j + 16 * k), bytes);
      }
    }
    for (; j < w; ++j) {  // the columns after the last 16 (to_byte: yuv_to_rgb_impl.h)
      const float sum = static_cast<float>(top[2 * j] + top[2 * j + 1] + bottom[2 * j] +
                                           bottom[2 * j + 1]);
      const float l = (sum * 0.25f - f.y0) * f.ys, cb = u[j] - 128.f, cr = v[j] - 128.f;
      out[3 * j] = to_byte(l + f.r_cr * cr);
      out[3 * j + 1] = to_byte(l + f.g_cb * cb + f.g_cr * cr);
      out[3 * j + 2] = to_byte(l + f.b_cb * cb);
    }
  }
}

}  // namespace cnnlstm_ext::video::isa_avx2

#pragma GCC pop_options

#endif
