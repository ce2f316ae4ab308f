// CPU kernel of yuv_to_rgb: a decoded planar YUV frame -> RGB uint8 at a smaller size, area
// resampled (each output pixel the mean of the source area it covers), one output row at a time
// (yuv_to_rgb_impl.h, built for the baseline here and for AVX2 in yuv_to_rgb_avx2.cpp, which
// also holds its 8-rows-at-a-time and half-size 4:2:0 variants, chosen below). The data
// path's video reader (cnnlstm_ext/data/video_io.py) runs it on every sampled frame: swscale's
// scaled rgb24 output cost more than decoding the frame, and its AREA filter is not the exact box
// of a 2x reduction.
//
// Resampling is linear and the YUV -> RGB matrix is affine, so the planes are resampled first
// (chroma at its own resolution, each chroma sample covering its sx x sy luma pixels) and only
// the output pixels are converted: the same values as converting every source pixel and then
// averaging, up to the clamp to [0, 255].
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu_capability.h"
#include "kernel_trace.h"
#include "video/yuv_to_rgb.h"

#define CNNLSTM_VIDEO_NS isa_default
#include "video/yuv_to_rgb_impl.h"
#undef CNNLSTM_VIDEO_NS

namespace cnnlstm_ext::video {
namespace {

void check_plane(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "yuv_to_rgb: ", name, " must be a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kByte, "yuv_to_rgb: ", name, " must be uint8, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) > 0 && t.size(1) > 0 && t.stride(1) == 1 &&
                  t.stride(0) >= t.size(1),
              "yuv_to_rgb: ", name, " must be a non-empty 2-D plane [rows, columns], each row "
              "contiguous and rows not overlapping, got shape ", t.sizes(), " and strides ",
              t.strides());
}

// The chroma subsampling of one axis: 1 (full) or 2 (half, rounded up), from the plane sizes.
int64_t subsampling(int64_t luma, int64_t chroma, const char* axis) {
  if (chroma == luma) return 1;
  TORCH_CHECK(chroma == (luma + 1) / 2, "yuv_to_rgb: the chroma planes must have the luma "
              "plane's ", axis, " (", luma, ") or half of it rounded up (", (luma + 1) / 2,
              "), got ", chroma);
  return 2;
}

// y: [H, W], u, v: [Hc, Wc] (Hc = H or ceil(H / 2), Wc likewise) -> [height, width, 3] RGB.
at::Tensor yuv_to_rgb_cpu(const at::Tensor& y, const at::Tensor& u, const at::Tensor& v,
                          int64_t height, int64_t width, double kr, double kb, bool full_range) {
  check_plane(y, "y");
  check_plane(u, "u");
  check_plane(v, "v");
  TORCH_CHECK(u.sizes() == v.sizes(), "yuv_to_rgb: u and v must have the same shape, got ",
              u.sizes(), " and ", v.sizes());
  const int64_t H = y.size(0), W = y.size(1), Hc = u.size(0), Wc = u.size(1);
  const int64_t sy = subsampling(H, Hc, "height"), sx = subsampling(W, Wc, "width");
  TORCH_CHECK(height >= 1 && height <= H && width >= 1 && width <= W,
              "yuv_to_rgb: the output size must be between 1 x 1 and the frame's ", H, " x ", W,
              " (it only reduces), got ", height, " x ", width);
  TORCH_CHECK(kr > 0 && kb > 0 && kr + kb < 1, "yuv_to_rgb: the matrix coefficients must "
              "satisfy 0 < kr, 0 < kb, kr + kb < 1, got kr = ", kr, ", kb = ", kb);
  // Y' = (Y - 16) 255/219, C = (U or V - 128) 255/224 (limited range); Y' = Y, C = U or V - 128
  // (full); then R = Y' + 2 (1 - kr) Cr, B = Y' + 2 (1 - kb) Cb, G = (Y' - kr R - kb B) / kg.
  const double kg = 1 - kr - kb, cs = full_range ? 1.0 : 255.0 / 224.0;
  auto out = at::empty({height, width, 3}, y.options());
  // 4:2:0 halved (256 x 256 to the loader's 128 x 128): chroma is already at the output's size.
  const bool fast_half = sy == 2 && sx == 2 && H == 2 * height && W == 2 * width &&
                         cpu_has_avx2();
  const auto filter = [&](int64_t n, int64_t sub, int64_t extent, int64_t m) {
    return fast_half ? AreaFilter{} : area_filter(n, sub, extent, m);  // (unused there)
  };
  const YuvFrame frame{y.const_data_ptr<uint8_t>(), u.const_data_ptr<uint8_t>(),
                       v.const_data_ptr<uint8_t>(), y.stride(0), u.stride(0), v.stride(0), W, Wc,
                       height, width,
                       filter(H, 1, H, height), filter(W, 1, W, width),
                       filter(Hc, sy, H, height), filter(Wc, sx, W, width),
                       full_range ? 0.f : 16.f, full_range ? 1.f : 255.f / 219.f,
                       static_cast<float>(2 * (1 - kr) * cs),
                       static_cast<float>(-2 * kb * (1 - kb) / kg * cs),
                       static_cast<float>(-2 * kr * (1 - kr) / kg * cs),
                       static_cast<float>(2 * (1 - kb) * cs), out.data_ptr<uint8_t>()};
#ifdef CNNLSTM_EXT_X86_SIMD
  if (fast_half) {
    record_kernel("cpu:yuv_to_rgb:avx2:half");
    isa_avx2::convert_half(frame);
    return out;
  }
  if (cpu_has_avx2()) {
    // Luma windows of fractional width, or of more than 4 pixels: the row kernel would gather.
    if (frame.fhy.factor == 0 || frame.fhy.factor > 4) {
      record_kernel("cpu:yuv_to_rgb:avx2:blocked");
      isa_avx2::convert_blocked(frame);
      return out;
    }
    record_kernel("cpu:yuv_to_rgb:avx2");  // whole factors up to 4: strided means, a row at a time
    isa_avx2::convert(frame);
    return out;
  }
#endif
  record_kernel("cpu:yuv_to_rgb:default");
  isa_default::convert(frame);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CPU, m) { m.impl("yuv_to_rgb", &yuv_to_rgb_cpu); }

}  // namespace cnnlstm_ext::video
