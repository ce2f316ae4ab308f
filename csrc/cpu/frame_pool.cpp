// frame_pool_forward / frame_pool_backward on the CPU.
//
// Forward: x: [N, C, h, w] (N = B*T, frame n = b*T + t) -> out: [T, B, C] (or [B, T, C]), the
// average or maximum over h*w, written once, straight into its final row and dtype.
// Backward: grad_out -> grad_x: [N, C, h, w] in x's layout and dtype, every element written once.
//
// On the CPU a pass over the maps is bound by memory, and ATen's reductions and copies already
// run at that rate with the widest vector unit of the CPU (dispatched at run time; this library
// is built for the baseline x86-64). So the average and the backward are ATen kernels that write
// straight into the final layout and dtype; fusion saves the transposing copy of the output and
// the intermediate tensors. The maximum, for which ATen has no kernel that returns the int32
// argmax this op saves (nor picks the first of several NaNs), is our own loops below, for
// channels_last maps built for AVX2 where the CPU has it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/cpu_capability.h"
#include "cpu/pooling_reduce.h"
#include "pooling_args.h"

#ifdef CNNLSTM_EXT_X86_SIMD
#include <immintrin.h>
#endif

namespace cnnlstm_ext::cpu {
namespace {

using pooling::FrameMode;
using pooling::FramePoolShape;

// Row of out: [T, B, C] (or [B, T, C] when batch_first) that frame n = b*T + t fills.
inline int64_t out_row(const FramePoolShape& s, bool batch_first, int64_t n) {
  return batch_first ? n : (n % s.T) * s.B + n / s.T;
}

// x: [N, C, HW] contiguous, mode "max". Tiles of kTile planes are transposed to [HW, kTile] in a
// small buffer (L1-resident), whose columns then reduce with the vectorised max_rows.
template <typename in_t, typename out_t>
void frame_max_pool_contiguous(const in_t* x, out_t* out, int32_t* argmax, const FramePoolShape& s,
                               bool batch_first) {
  using A = acc_t<in_t>;
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

#ifdef CNNLSTM_EXT_X86_SIMD
// A frame of channels_last maps reduced with AVX2, for float32, bfloat16 and float16 (max_rows,
// built for the baseline x86-64, is compute-bound there on its 4-lane compare-and-blend): the
// running maximum (float32) and its index of the frame's C channels stay in L1 while its rows
// stream through.
template <typename in_t>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const in_t* p) {
  if constexpr (std::is_same_v<in_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<in_t, c10::BFloat16>) {  // the upper half of a float32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    static_assert(std::is_same_v<in_t, c10::Half>);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// frame: [h*w, C]; m: [C] float32 and a: [C] int32 receive the maximum and its row.
template <typename in_t>
__attribute__((target("avx2,fma,f16c"))) void frame_max_channels_last_avx2(
    const in_t* frame, int64_t HW, int64_t C, float* m, int32_t* a) {
  constexpr int64_t kV = 8;
  const int64_t c_vec = C - C % kV;
  for (int64_t c = 0; c < C; ++c) {
    m[c] = static_cast<float>(frame[c]);
    a[c] = 0;
  }
  for (int64_t r = 1; r < HW; ++r) {
    const in_t* row = frame + r * C;
    const __m256 ri = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(r)));
    for (int64_t c = 0; c < c_vec; c += kV) {
      const __m256 v = load8(row + c), mv = _mm256_loadu_ps(m + c);
      // larger, or the first NaN (torch.max: NaN wins), as replaces_max
      const __m256 take = _mm256_or_ps(
          _mm256_cmp_ps(v, mv, _CMP_GT_OQ),
          _mm256_and_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(mv, mv, _CMP_ORD_Q)));
      _mm256_storeu_ps(m + c, _mm256_blendv_ps(mv, v, take));
      const __m256 k = _mm256_loadu_ps(reinterpret_cast<const float*>(a + c));
      _mm256_storeu_ps(reinterpret_cast<float*>(a + c), _mm256_blendv_ps(k, ri, take));
    }
    for (int64_t c = c_vec; c < C; ++c) {
      const float v = static_cast<float>(row[c]);
      const bool take = replaces_max(v, m[c]);
      m[c] = take ? v : m[c];
      a[c] = take ? static_cast<int32_t>(r) : a[c];
    }
  }
}
#endif  // CNNLSTM_EXT_X86_SIMD

// x: [N, h*w, C] in memory (channels_last), mode "max": each frame's h*w rows are reduced in
// order (the rule of torch.max and of the other kernels: NaN wins, then the first index) and
// written to out's row and the int32 argmax. (ATen's kernel takes the last of several NaNs.)
// avx2: frame_max_channels_last_avx2 instead of the portable max_rows (not for float64).
template <typename in_t, typename out_t>
void frame_max_pool_channels_last(const in_t* x, out_t* out, int32_t* argmax,
                                  const FramePoolShape& s, bool batch_first, bool avx2) {
  using A = acc_t<in_t>;
  const int64_t HW = s.HW(), C = s.C;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (HW * C));
  at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> m(C);
    for (int64_t n = begin; n < end; ++n) {
      const in_t* frame = x + n * HW * C;
      bool done = false;
#ifdef CNNLSTM_EXT_X86_SIMD
      if constexpr (std::is_same_v<A, float>) {
        if (avx2) {
          frame_max_channels_last_avx2(frame, HW, C, m.data(), argmax + n * C);
          done = true;
        }
      }
#endif
      if (!done) max_rows(frame, C, HW, C, m.data(), argmax + n * C);
      out_t* o = out + out_row(s, batch_first, n) * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<out_t>(m[c]);
    }
  });
}

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
  if (mode == FrameMode::Avg) {
    // Frame n = b*T + t, so x is [B, T, C, h, w]; the mean accumulates in float32 (float64).
    at::Tensor out_btc = batch_first ? out : out.transpose(0, 1);  // [B, T, C] view of out
    at::mean_out(out_btc, xc.view({s.B, s.T, s.C, s.H, s.W}), {3, 4}, false, odt);
  } else {
    int32_t* idx = argmax.data_ptr<int32_t>();
    CNNLSTM_DISPATCH_POOLING_TYPES(xc.scalar_type(), "frame_pool_forward", [&] {
      using in_t = scalar_t;
      CNNLSTM_DISPATCH_POOLING_TYPES(odt, "frame_pool_forward", [&] {
        const in_t* xp = xc.const_data_ptr<in_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        if (s.channels_last)
          frame_max_pool_channels_last(xp, op, idx, s, batch_first, cpu_has_avx2());
        else
          frame_max_pool_contiguous(xp, op, idx, s, batch_first);
      });
    });
  }
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

}  // namespace cnnlstm_ext::cpu
