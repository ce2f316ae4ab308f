// frame_pool_forward / frame_pool_backward on the CPU.
//
// Forward: x: [N, C, h, w] (N = B*T, frame n = b*T + t) -> out: [T, B, C] (or [B, T, C]), the
// average or maximum over h*w, written once, straight into its final row and dtype.
// Backward: grad_out -> grad_x: [N, C, h, w] in x's layout and dtype.
//
// A pass over the maps is bound by memory. The forward is our own loops, each frame's maps read
// once and in order, built for AVX2 (F16C for float16) where the CPU has it, for float32, bfloat16
// and float16 maps: float32 maps are read at the rate of a plain `sum` of them. (ATen's mean reads
// channels_last maps at 2/3 of that rate, 1/20 for 16-bit types; its max pooling of contiguous
// maps at 1/7.) Elsewhere (no AVX2, float64; contiguous planes under 8 elements for the maximum)
// the average is ATen's mean, written straight into out's layout and dtype, and the maximum
// portable loops. The maximum follows torch.max: NaN wins, then the first index (ATen's max
// pooling takes the last NaN); it also writes the int32 argmax. The backward is ATen's copy
// (average) or fill and scatter (maximum) into grad_x in x's layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_capability.h"
#include "pooling/pooling_cpu_reduce.h"
#include "pooling/pooling.h"

namespace cnnlstm_ext::pooling {
namespace {

using pooling::FrameMode;
using pooling::FramePoolShape;

// Row of out: [T, B, C] (or [B, T, C] when batch_first) that frame n = b*T + t fills.
inline int64_t out_row(const FramePoolShape& s, bool batch_first, int64_t n) {
  return batch_first ? n : (n % s.T) * s.B + n / s.T;
}

#ifdef CNNLSTM_EXT_X86_SIMD
// The contiguous-maps kernels with AVX2 (the channels_last ones are pooling_reduce.h's sum_rows and
// max_rows), for float32, bfloat16 and float16 maps.
using avx2::load8;
using avx2::update_max8;

// [s(v0), s(v1), ..., s(v7)], s = the sum of a vector's 8 lanes.
CNNLSTM_EXT_AVX2 inline __m256 lane_sums8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // u0 = [lanes 0-3 of v0..v3 | lanes 4-7 of v0..v3], u1 likewise for v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// The 8 partial sums of one plane p: [HW], HW >= 8.
template <typename in_t>
CNNLSTM_EXT_AVX2 inline __m256 plane_sum8(const in_t* p, int64_t HW) {
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();  // two chains of adds in flight
  int64_t k = 0;
  for (; k + 16 <= HW; k += 16) {
    a = _mm256_add_ps(a, load8(p + k));
    b = _mm256_add_ps(b, load8(p + k + 8));
  }
  if (k + 8 <= HW) {
    a = _mm256_add_ps(a, load8(p + k));
    k += 8;
  }
  if (k < HW) {
    // The tail: the plane's last 8 elements, of which the first 8 - (HW - k) were added above.
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i first_new = _mm256_set1_epi32(static_cast<int>(7 - (HW - k)));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, first_new));
    b = _mm256_add_ps(b, _mm256_and_ps(load8(p + HW - 8), keep));
  }
  return _mm256_add_ps(a, b);
}

// frame: [C, h*w] (contiguous maps); m: [C] float32 receives the sums of its planes, 8 planes at
// a time (their partial sums added across lanes together).
template <typename in_t>
CNNLSTM_EXT_AVX2 void frame_sum_contiguous_avx2(const in_t* frame, int64_t HW, int64_t C, float* m) {
  if (HW < 8) {  // planes shorter than a vector: scalar sums, the frame read in order
    for (int64_t c = 0; c < C; ++c) {
      float sum = 0.f;
      for (int64_t k = 0; k < HW; ++k) sum += static_cast<float>(frame[c * HW + k]);
      m[c] = sum;
    }
    return;
  }
  __m256 v[8];
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    for (int j = 0; j < 8; ++j) v[j] = plane_sum8(frame + (c + j) * HW, HW);
    _mm256_storeu_ps(m + c, lane_sums8(v));
  }
  for (int j = 0; j < 8; ++j) v[j] = c + j < C ? plane_sum8(frame + (c + j) * HW, HW) : _mm256_setzero_ps();
  alignas(32) float sums[8];
  _mm256_store_ps(sums, lane_sums8(v));
  for (int j = 0; c + j < C; ++j) m[c + j] = sums[j];
}

// r[l] := lane l of the old r[0], ..., r[7] (an 8 x 8 transpose).
CNNLSTM_EXT_AVX2 inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// frame: [C, h*w] (contiguous maps, h*w >= 8); m: [C] float32 and a: [C] int32 receive each
// plane's maximum and the index of its first occurrence. A plane reduces into 8 lanes, each
// keeping the first occurrence of its own maximum; then 8 planes at a time across lanes, after a
// transpose (lane j of every vector: plane j): the maximum, then its smallest index (and the value
// there: of +0 and -0, the first).
template <typename in_t>
CNNLSTM_EXT_AVX2 void frame_max_contiguous_avx2(const in_t* frame, int64_t HW, int64_t C, float* m,
                                                int32_t* a) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t c = 0; c < C; c += 8) {
    const int64_t cn = std::min<int64_t>(8, C - c);
    __m256 mv[8], mi[8];  // mi: int32 indices, as float bits for the transpose
    for (int64_t j = 0; j < 8; ++j) {
      const in_t* p = frame + (c + std::min(j, cn - 1)) * HW;  // past C: the last plane again
      __m256 v = load8(p);
      __m256i vi = lane;
      int64_t k = 8;
      for (; k + 8 <= HW; k += 8)
        update_max8(load8(p + k), _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(k))), v, vi);
      // The tail: the plane's last 8 elements. Those already seen come again with their own
      // index, higher than any index their new lane has seen: each lane keeps a first occurrence.
      if (k < HW) {
        const __m256i tail = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(HW - 8)));
        update_max8(load8(p + HW - 8), tail, v, vi);
      }
      mv[j] = v;
      mi[j] = _mm256_castsi256_ps(vi);
    }
    transpose8(mv);
    transpose8(mi);
    __m256 best = mv[0];
    for (int l = 1; l < 8; ++l)  // NaN wins
      best = _mm256_blendv_ps(best, mv[l], _mm256_and_ps(_mm256_cmp_ps(mv[l], best, _CMP_NLE_UQ),
                                                          _mm256_cmp_ps(best, best, _CMP_ORD_Q)));
    const __m256 best_nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
    __m256 value = best;
    __m256i index = _mm256_set1_epi32(INT32_MAX);
    for (int l = 0; l < 8; ++l) {
      const __m256i li = _mm256_castps_si256(mi[l]);
      const __m256 holds = _mm256_or_ps(_mm256_cmp_ps(mv[l], best, _CMP_EQ_OQ),
                                        _mm256_and_ps(_mm256_cmp_ps(mv[l], mv[l], _CMP_UNORD_Q), best_nan));
      const __m256 earlier = _mm256_and_ps(holds, _mm256_castsi256_ps(_mm256_cmpgt_epi32(index, li)));
      value = _mm256_blendv_ps(value, mv[l], earlier);
      index = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(index), mi[l], earlier));
    }
    alignas(32) float values[8];
    alignas(32) int32_t indices[8];
    _mm256_store_ps(values, value);
    _mm256_store_si256(reinterpret_cast<__m256i*>(indices), index);
    for (int64_t j = 0; j < cn; ++j) {
      m[c + j] = values[j];
      a[c + j] = indices[j];
    }
  }
}

#endif  // CNNLSTM_EXT_X86_SIMD

// One pass over the frames of x: reduce(n, m) leaves frame n's C results in m (acc type), which
// are divided by `divisor` and written to out's row in out's dtype.
template <typename A, typename out_t, typename Reduce>
void for_each_frame(out_t* out, const FramePoolShape& s, bool batch_first, A divisor, Reduce reduce) {
  const int64_t C = s.C;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (s.HW() * C));
  at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> m(C);
    for (int64_t n = begin; n < end; ++n) {
      reduce(n, m.data());
      out_t* o = out + out_row(s, batch_first, n) * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<out_t>(m[c] / divisor);
    }
  });
}

// x: [N, C, HW] contiguous, mode "max". With AVX2 (float32, bfloat16, float16, planes of 8
// elements or more), frame_max_contiguous_avx2 on each frame. Otherwise tiles of kTile planes are
// transposed to [HW, kTile] in a small buffer (L1-resident), whose columns then reduce with the
// vectorised max_rows.
template <typename in_t, typename out_t>
void frame_max_pool_contiguous(const in_t* x, out_t* out, int32_t* argmax, const FramePoolShape& s,
                               bool batch_first, bool avx2) {
  using A = acc_t<in_t>;
#ifdef CNNLSTM_EXT_X86_SIMD
  if constexpr (std::is_same_v<A, float>) {
    if (avx2 && s.HW() >= 8) {
      for_each_frame<float>(out, s, batch_first, 1.f, [&](int64_t n, float* m) {
        frame_max_contiguous_avx2(x + n * s.C * s.HW(), s.HW(), s.C, m, argmax + n * s.C);
      });
      return;
    }
  }
#endif
  constexpr int64_t kTile = 16;
  const int64_t HW = s.HW(), C = s.C, tiles = (C + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (HW * kTile));
  at::parallel_for(0, s.N * tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> tile(HW * kTile);
    A m[kTile];
    int32_t idx[kTile];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / tiles, c0 = (i % tiles) * kTile, cn = std::min(kTile, C - c0);
      const in_t* src = x + (n * C + c0) * HW;
      for (int64_t j = 0; j < cn; ++j)  // reads in order; writes stay in the L1-resident tile
        for (int64_t k = 0; k < HW; ++k) tile[k * kTile + j] = static_cast<A>(src[j * HW + k]);
      max_rows(tile.data(), kTile, HW, cn, m, idx);
      out_t* o = out + out_row(s, batch_first, n) * C + c0;
      for (int64_t j = 0; j < cn; ++j) {
        o[j] = static_cast<out_t>(m[j]);
        argmax[n * C + c0 + j] = idx[j];
      }
    }
  });
}

// x: [N, h*w, C] in memory (channels_last), mode "max": each frame's h*w rows are reduced in
// order (the rule of torch.max and of the other kernels: NaN wins, then the first index) and
// written to out's row and the int32 argmax. (ATen's kernel takes the last of several NaNs.)
template <typename in_t, typename out_t>
void frame_max_pool_channels_last(const in_t* x, out_t* out, int32_t* argmax,
                                  const FramePoolShape& s, bool batch_first) {
  using A = acc_t<in_t>;
  const int64_t HW = s.HW(), C = s.C;
  for_each_frame<A>(out, s, batch_first, A(1), [&](int64_t n, A* m) {
    max_rows(x + n * HW * C, C, HW, C, m, argmax + n * C);
  });
}

#ifdef CNNLSTM_EXT_X86_SIMD
// Mode "avg" of float32, bfloat16 and float16 maps, either layout, with AVX2: sums in float32,
// each frame's maps read once and in order.
template <typename in_t, typename out_t>
void frame_avg_pool_avx2(const in_t* x, out_t* out, const FramePoolShape& s, bool batch_first) {
  const int64_t HW = s.HW(), C = s.C;
  for_each_frame<float>(out, s, batch_first, static_cast<float>(HW), [&](int64_t n, float* m) {
    const in_t* frame = x + n * HW * C;
    if (s.channels_last) sum_rows(frame, C, HW, C, m);
    else frame_sum_contiguous_avx2(frame, HW, C, m);
  });
}
#endif

#define CNNLSTM_DISPATCH_POOLING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> frame_pool_forward_cpu(const at::Tensor& x, int64_t batch_size,
                                                          c10::string_view mode_name, bool batch_first,
                                                          std::optional<at::ScalarType> out_dtype) {
  const FrameMode mode = pooling::parse_frame_mode(mode_name);
  TORCH_CHECK(x.device().is_cpu(), "frame_pool: x must be a CPU tensor here, got ", x.device());
  FramePoolShape s;
  const at::Tensor xc = pooling::frame_pool_input(x, batch_size, s);
  const at::ScalarType odt = out_dtype.value_or(x.scalar_type());
  pooling::check_pooling_dtype(odt, "frame_pool", "out_dtype");
  at::Tensor out = pooling::frame_pool_new_output(s, batch_first, x.options().dtype(odt));
  at::Tensor argmax = mode == FrameMode::Max ? at::empty({s.N, s.C}, x.options().dtype(at::kInt))
                                             : at::empty({0}, x.options().dtype(at::kInt));
  if (xc.numel() == 0) return {out, argmax};
  if (mode == FrameMode::Avg && (xc.scalar_type() == at::kDouble || !cpu_has_avx2())) {
    // Frame n = b*T + t, so x is [B, T, C, h, w]; the mean accumulates in float32 (float64).
    at::Tensor out_btc = batch_first ? out : out.transpose(0, 1);  // [B, T, C] view of out
    at::mean_out(out_btc, xc.view({s.B, s.T, s.C, s.H, s.W}), {3, 4}, false, odt);
    return {out, argmax};
  }
  int32_t* idx = mode == FrameMode::Max ? argmax.data_ptr<int32_t>() : nullptr;
  CNNLSTM_DISPATCH_POOLING_TYPES(xc.scalar_type(), "frame_pool_forward", [&] {
    using in_t = scalar_t;
    CNNLSTM_DISPATCH_POOLING_TYPES(odt, "frame_pool_forward", [&] {
      const in_t* xp = xc.const_data_ptr<in_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      if (mode == FrameMode::Avg) {  // AVX2 and not float64 (above)
#ifdef CNNLSTM_EXT_X86_SIMD
        if constexpr (!std::is_same_v<in_t, double>) frame_avg_pool_avx2(xp, op, s, batch_first);
#endif
      } else if (s.channels_last) {
        frame_max_pool_channels_last(xp, op, idx, s, batch_first);
      } else {
        frame_max_pool_contiguous(xp, op, idx, s, batch_first, cpu_has_avx2());
      }
    });
  });
  return {out, argmax};
}

at::Tensor frame_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& argmax,
                                   at::IntArrayRef x_size, at::ScalarType x_dtype, bool channels_last,
                                   int64_t batch_size, c10::string_view mode_name, bool batch_first) {
  const FrameMode mode = pooling::parse_frame_mode(mode_name);
  TORCH_CHECK(grad_out.device().is_cpu(), "frame_pool_backward: grad_out must be a CPU tensor here, got ",
              grad_out.device());
  pooling::check_pooling_dtype(x_dtype, "frame_pool_backward", "x_dtype");
  const FramePoolShape s = pooling::frame_pool_shape(x_size, batch_size, channels_last);
  pooling::check_frame_pool_grad(grad_out, argmax, s, mode, batch_first);
  at::Tensor grad_x = at::empty(x_size, grad_out.options().dtype(x_dtype).memory_format(
                                            channels_last ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous));
  if (grad_x.numel() == 0) return grad_x;
  // g: [N, C] in frame order (n = b*T + t), in the accumulation dtype.
  const auto acc = x_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = (batch_first ? grad_out : grad_out.transpose(0, 1)).to(acc).reshape({s.N, s.C});
  if (mode == FrameMode::Avg) {
    grad_x.copy_((g / static_cast<double>(s.HW())).view({s.N, s.C, 1, 1}).expand(x_size));
  } else {
    grad_x.zero_();
    const at::Tensor idx = argmax.to(at::kLong);
    const at::Tensor gx = g.to(x_dtype);
    if (channels_last) {  // memory [N, h, w, C]: scatter along the h*w rows of each frame
      grad_x.permute({0, 2, 3, 1}).view({s.N, s.HW(), s.C})
          .scatter_(1, idx.view({s.N, 1, s.C}), gx.view({s.N, 1, s.C}));
    } else {
      grad_x.view({s.N, s.C, s.HW()}).scatter_(2, idx.view({s.N, s.C, 1}), gx.view({s.N, s.C, 1}));
    }
  }
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CPU, m) {
  m.impl("frame_pool_forward", &frame_pool_forward_cpu);
  m.impl("frame_pool_backward", &frame_pool_backward_cpu);
}

}  // namespace cnnlstm_ext::pooling
