// The row kernels of yuv_to_rgb (yuv_to_rgb.h), for the namespace CNNLSTM_VIDEO_NS: plain C++
// loops that the compiler vectorises for the instruction set of the including translation unit.
// Each output row: per plane, the vertical taps summed over the source row (vectorised), then
// the horizontal taps (a strided mean for a whole-factor reduction, vectorised; a gather of the
// taps otherwise); then the conversion of the row to RGB bytes.
#include "video/yuv_to_rgb.h"

namespace cnnlstm_ext::video::CNNLSTM_VIDEO_NS {
namespace {

// out[j] = mean of row[j * F .. j * F + F).
template <int F>
void horizontal_mean(const float* __restrict row, int64_t m, float* __restrict out) {
  constexpr float scale = 1.f / F;
  for (int64_t j = 0; j < m; ++j) {
    float acc = row[j * F];
    for (int k = 1; k < F; ++k) acc += row[j * F + k];
    out[j] = acc * scale;
  }
}

// out[j] = sum_k weight[k, j] * row[start[j] + k], tap by tap over all outputs (a gather).
void horizontal_taps(const float* __restrict row, const AreaFilter& f, int64_t m,
                     float* __restrict out) {
  const int32_t* __restrict start = f.start.data();
  const float* __restrict w = f.weight.data();
  for (int64_t j = 0; j < m; ++j) out[j] = w[j] * row[start[j]];
  for (int64_t k = 1; k < f.taps; ++k) {
    const float* __restrict wk = w + k * m;
    const float* __restrict rk = row + k;
    for (int64_t j = 0; j < m; ++j) out[j] += wk[j] * rk[start[j]];
  }
}

void horizontal(const float* __restrict row, const AreaFilter& f, int64_t m,
                float* __restrict out) {
  switch (f.factor) {
    case 1: std::copy(row, row + m, out); return;
    case 2: return horizontal_mean<2>(row, m, out);
    case 3: return horizontal_mean<3>(row, m, out);
    case 4: return horizontal_mean<4>(row, m, out);
    default: break;
  }
  horizontal_taps(row, f, m, out);
}

// Output row i of one plane ([rows, n] uint8, rows ld apart) summed over its vertical taps into
// tmp [n]: the source row's values before the horizontal taps.
void vertical(const uint8_t* plane, int64_t ld, int64_t n, const AreaFilter& fv, int64_t i,
              float* __restrict tmp) {
  const int64_t rows = static_cast<int64_t>(fv.start.size());
  const float* wv = fv.weight.data() + i;  // tap k: wv[k * rows]
  const uint8_t* __restrict src = plane + fv.start[i] * ld;
  const float w0 = wv[0];
  for (int64_t x = 0; x < n; ++x) tmp[x] = w0 * static_cast<float>(src[x]);
  for (int64_t k = 1; k < fv.taps; ++k) {
    const uint8_t* __restrict r = src + k * ld;
    const float wk = wv[k * rows];
    if (wk == 0.f) continue;
    for (int64_t x = 0; x < n; ++x) tmp[x] += wk * static_cast<float>(r[x]);
  }
}

inline uint8_t to_byte(float v) {  // round half up, clamp to [0, 255]
  const int32_t rounded = static_cast<int32_t>(v + 0.5f);  // (negative ones clamp to 0)
  return static_cast<uint8_t>(std::min<int32_t>(255, std::max<int32_t>(0, rounded)));
}

// One output row of the resampled planes yy, uu, vv [w] into RGB bytes out [w, 3]; rgb: [3 w]
// scratch.
void convert_row(const YuvFrame& f, const float* __restrict yy, const float* __restrict uu,
                 const float* __restrict vv, uint8_t* __restrict rgb, uint8_t* __restrict o) {
  const int64_t w = f.width;
  uint8_t* __restrict r = rgb;
  uint8_t* __restrict g = r + w;
  uint8_t* __restrict b = g + w;
  for (int64_t j = 0; j < w; ++j) {  // vectorised; the bytes are interleaved below
    const float l = (yy[j] - f.y0) * f.ys, cb = uu[j] - 128.f, cr = vv[j] - 128.f;
    r[j] = to_byte(l + f.r_cr * cr);
    g[j] = to_byte(l + f.g_cb * cb + f.g_cr * cr);
    b[j] = to_byte(l + f.b_cb * cb);
  }
  for (int64_t j = 0; j < w; ++j) {
    o[3 * j] = r[j];
    o[3 * j + 1] = g[j];
    o[3 * j + 2] = b[j];
  }
}

}  // namespace

void convert(const YuvFrame& f) {
  const int64_t w = f.width;
  std::vector<float> tmp(f.W), yr(w), ur(w), vr(w);
  std::vector<uint8_t> rgb(3 * w);
  for (int64_t i = 0; i < f.height; ++i) {
    vertical(f.y, f.ld_y, f.W, f.fvy, i, tmp.data());
    horizontal(tmp.data(), f.fhy, w, yr.data());
    vertical(f.u, f.ld_u, f.Wc, f.fvc, i, tmp.data());
    horizontal(tmp.data(), f.fhc, w, ur.data());
    vertical(f.v, f.ld_v, f.Wc, f.fvc, i, tmp.data());
    horizontal(tmp.data(), f.fhc, w, vr.data());
    convert_row(f, yr.data(), ur.data(), vr.data(), rgb.data(), f.out + i * w * 3);
  }
}

}  // namespace cnnlstm_ext::video::CNNLSTM_VIDEO_NS
