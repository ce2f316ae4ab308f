// yuv_to_rgb's row kernels (yuv_to_rgb_impl.h), built once per instruction set: the baseline in
// yuv_to_rgb_cpu.cpp, AVX2/FMA in yuv_to_rgb_avx2.cpp (the same C++ code vectorised 8 wide).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_capability.h"

namespace cnnlstm_ext::video {

// Area weights of one axis: output j covers [j * s, (j + 1) * s) of the luma axis of `extent`
// pixels (s = extent / m); input sample c covers [c * sub, (c + 1) * sub) of it, clipped to the
// axis (sub = 2 for subsampled chroma). Each output reads `taps` samples from start[j] on, tap k
// with weight[k * m + j] (0 past its window; the weights of an output sum to 1): tap by tap, the
// outputs' weights are contiguous, a vector gather away from their samples. factor > 0 marks a
// reduction by a whole factor (1: a copy): output j is the mean of [j * factor, (j + 1) * factor).
struct AreaFilter {
  int64_t taps = 0;
  int64_t factor = 0;
  std::vector<int32_t> start;  // [m]
  std::vector<float> weight;   // [taps, m]
};

inline AreaFilter area_filter(int64_t n, int64_t sub, int64_t extent, int64_t m) {
  AreaFilter f;
  const double s = static_cast<double>(extent) / m;
  const auto first = [&](int64_t j) { return static_cast<int64_t>(std::floor(j * s / sub)); };
  const auto end = [&](int64_t j) {
    return std::min<int64_t>(n, static_cast<int64_t>(std::ceil((j + 1) * s / sub)));
  };
  for (int64_t j = 0; j < m; ++j) f.taps = std::max(f.taps, end(j) - first(j));
  f.start.resize(m);
  f.weight.assign(m * f.taps, 0.f);
  for (int64_t j = 0; j < m; ++j) {
    const double a = j * s, b = (j + 1) * s;
    const int64_t c0 = std::min(first(j), n - f.taps);  // the last windows start earlier
    f.start[j] = static_cast<int32_t>(c0);
    for (int64_t k = 0; k < f.taps; ++k) {
      const int64_t c = c0 + k;
      const double lo = std::max(a, static_cast<double>(c * sub));
      const double hi =
          std::min({b, static_cast<double>((c + 1) * sub), static_cast<double>(extent)});
      f.weight[k * m + j] = static_cast<float>(std::max(0.0, hi - lo) / s);
    }
  }
  // Windows of q = extent / m whole pixels, each q / sub whole samples: a plain mean of each run.
  if (extent % m == 0 && (extent / m) % sub == 0 && n * sub == extent) f.factor = extent / m / sub;
  return f;
}

// One frame: the planes (rows ld_* bytes apart), the filters, the conversion and the output.
struct YuvFrame {
  const uint8_t *y, *u, *v;
  int64_t ld_y, ld_u, ld_v;
  int64_t W, Wc;           // columns of the luma and chroma planes
  int64_t height, width;   // of the output
  AreaFilter fvy, fhy, fvc, fhc;  // vertical and horizontal, luma and chroma
  // R = l + r_cr Cr, G = l + g_cb Cb + g_cr Cr, B = l + b_cb Cb; l = (Y - y0) ys, C = U or V - 128
  float y0, ys, r_cr, g_cb, g_cr, b_cb;
  uint8_t* out;            // [height, width, 3]
};

namespace isa_default {
void convert(const YuvFrame& f);
}
#ifdef CNNLSTM_EXT_X86_SIMD
namespace isa_avx2 {
void convert(const YuvFrame& f);
// The loader's common case: a 4:2:0 frame halved, luma by 2 x 2 means and chroma at its own size
// (filters unused).
void convert_half(const YuvFrame& f);
// convert, 8 output rows at a time: the horizontal taps of windows of fractional width without
// gathers.
void convert_blocked(const YuvFrame& f);
}
#endif

}  // namespace cnnlstm_ext::video
