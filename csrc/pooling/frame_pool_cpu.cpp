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
// maps at 1/7.) The vector kernels are pooling_cpu_kernels.h's. Elsewhere (no AVX2, float64;
// contiguous planes under 8 elements for the maximum)
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

#include "pooling/pooling_cpu_kernels.h"
#include "pooling/pooling_cpu_reduce.h"
#include "pooling/pooling.h"

namespace cnnlstm_ext::pooling {
namespace {


// Row of out: [T, B, C] (or [B, T, C] when batch_first) that frame n = b*T + t fills.
inline int64_t out_row(const FramePoolShape& s, bool batch_first, int64_t n) {
  return batch_first ? n : (n % s.T) * s.B + n / s.T;
}

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

// x: [N, C, HW] contiguous, mode "max". With a vector kernel (float32, bfloat16, float16, planes
// of 8 elements or more), frame_max_contiguous on each frame. Otherwise tiles of kTile planes are
// transposed to [HW, kTile] in a small buffer (L1-resident), whose columns then reduce with the
// vectorised max_rows.
template <typename in_t, typename out_t>
void frame_max_pool_contiguous(const in_t* x, out_t* out, int32_t* argmax, const FramePoolShape& s,
                               bool batch_first) {
  using A = acc_t<in_t>;
  if constexpr (kVectorKernelInput<in_t>) {
    const auto kernel = pooling_cpu_kernels<in_t>().frame_max_contiguous;
    if (kernel && s.HW() >= 8) {
      for_each_frame<float>(out, s, batch_first, 1.f, [&](int64_t n, float* m) {
        kernel(x + n * s.C * s.HW(), s.HW(), s.C, m, argmax + n * s.C);
      });
      return;
    }
  }
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

// Mode "avg" of float32, bfloat16 and float16 maps, either layout, with the vector kernels: sums
// in float32, each frame's maps read once and in order.
template <typename in_t, typename out_t>
void frame_avg_pool_vector(const in_t* x, out_t* out, const FramePoolShape& s, bool batch_first) {
  const int64_t HW = s.HW(), C = s.C;
  const auto& kernels = pooling_cpu_kernels<in_t>();
  for_each_frame<float>(out, s, batch_first, static_cast<float>(HW), [&](int64_t n, float* m) {
    const in_t* frame = x + n * HW * C;
    if (s.channels_last) kernels.sum_rows(frame, C, HW, C, m);
    else kernels.frame_sum_contiguous(frame, HW, C, m);
  });
}

// Whether the average of maps of this dtype has vector kernels on this CPU.
bool avg_has_vector_kernels(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return pooling_cpu_kernels<float>().frame_sum_contiguous != nullptr;
    case at::kBFloat16: return pooling_cpu_kernels<c10::BFloat16>().frame_sum_contiguous != nullptr;
    case at::kHalf: return pooling_cpu_kernels<c10::Half>().frame_sum_contiguous != nullptr;
    default: return false;
  }
}

#define CNNLSTM_DISPATCH_POOLING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> frame_pool_forward_cpu(const at::Tensor& x, int64_t batch_size,
                                                          c10::string_view mode_name, bool batch_first,
                                                          std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x.device().is_cpu(), "frame_pool: x must be a CPU tensor here, got ", x.device());
  const FramePoolCall call = pooling::frame_pool_call(x, batch_size, mode_name, batch_first, out_dtype);
  const FrameMode mode = call.mode;
  const FramePoolShape& s = call.s;
  const at::Tensor& xc = call.x;
  const at::ScalarType odt = call.out_dtype;
  at::Tensor out = call.out, argmax = call.argmax;
  if (xc.numel() == 0) return {out, argmax};
  if (mode == FrameMode::Avg && !avg_has_vector_kernels(xc.scalar_type())) {
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
      if (mode == FrameMode::Avg) {  // with vector kernels (above)
        if constexpr (kVectorKernelInput<in_t>) frame_avg_pool_vector(xp, op, s, batch_first);
      } else if (s.channels_last) {
        frame_max_pool_channels_last(xp, op, idx, s, batch_first);
      } else {
        frame_max_pool_contiguous(xp, op, idx, s, batch_first);
      }
    });
  });
  return {out, argmax};
}

at::Tensor frame_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& argmax,
                                   at::IntArrayRef x_size, at::ScalarType x_dtype, bool channels_last,
                                   int64_t batch_size, c10::string_view mode_name, bool batch_first) {
  TORCH_CHECK(grad_out.device().is_cpu(), "frame_pool_backward: grad_out must be a CPU tensor here, got ",
              grad_out.device());
  const FramePoolBackwardCall call = pooling::frame_pool_backward_call(
      grad_out, argmax, x_size, x_dtype, channels_last, batch_size, mode_name, batch_first);
  const FrameMode mode = call.mode;
  const FramePoolShape& s = call.s;
  at::Tensor grad_x = call.grad_x;
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
