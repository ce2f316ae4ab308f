// frame_pool_forward / frame_pool_backward on the CPU.
//
// Forward: x: [N, C, h, w] (N = B*T, frame n = b*T + t) -> out: [T, B, C] (or [B, T, C]), the
// average or maximum over h*w, written once, straight into its final row and dtype.
// Backward: grad_out -> grad_x: [N, C, h, w] in x's layout and dtype, every element written once.
// Parallel over frames (channels_last) or over (frame, channel) planes (contiguous).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/pooling_reduce.h"
#include "pooling_args.h"

namespace cnnlstm_ext::cpu {
namespace {

using pooling::FrameMode;
using pooling::FramePoolShape;

// Row of out: [T, B, C] (or [B, T, C] when batch_first) that frame n = b*T + t fills.
inline int64_t out_row(const FramePoolShape& s, bool batch_first, int64_t n) {
  return batch_first ? n : (n % s.T) * s.B + n / s.T;
}

// x: [N, C, HW] contiguous, mode "avg". One frame per task; its planes of HW elements are summed
// four at a time.
template <typename in_t, typename out_t>
void frame_avg_pool_contiguous(const in_t* x, out_t* out, const FramePoolShape& s, bool batch_first) {
  using A = acc_t<in_t>;
  const int64_t HW = s.HW(), C = s.C;
  const A inv_hw = A(1) / static_cast<A>(HW);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (HW * C));
  at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
    A sums[4];
    for (int64_t n = begin; n < end; ++n) {
      const in_t* frame = x + n * C * HW;
      out_t* o = out + out_row(s, batch_first, n) * C;
      int64_t c = 0;
      for (; c + 4 <= C; c += 4) {
        sum_runs4(frame + c * HW, HW, sums);
        for (int j = 0; j < 4; ++j) o[c + j] = static_cast<out_t>(sums[j] * inv_hw);
      }
      for (; c < C; ++c) o[c] = static_cast<out_t>(sum_run(frame + c * HW, HW) * inv_hw);
    }
  });
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

// x: [N, HW, C] (channels_last). One frame per task: its HW rows of C channels are summed (or
// maxed) column-wise into a C-long accumulator, then written as one output row.
template <typename in_t, typename out_t>
void frame_pool_forward_channels_last(const in_t* x, out_t* out, int32_t* argmax,
                                      const FramePoolShape& s, FrameMode mode, bool batch_first) {
  using A = acc_t<in_t>;
  const int64_t HW = s.HW(), C = s.C;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (HW * C));
  at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(C);
    for (int64_t n = begin; n < end; ++n) {
      const in_t* frame = x + n * HW * C;
      out_t* o = out + out_row(s, batch_first, n) * C;
      if (mode == FrameMode::Avg) {
        sum_rows(frame, C, HW, C, acc.data());
        const A scale = A(1) / static_cast<A>(HW);
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<out_t>(acc[c] * scale);
      } else {
        max_rows(frame, C, HW, C, acc.data(), argmax + n * C);
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<out_t>(acc[c]);
      }
    }
  });
}

// grad_x: [N, C, HW] contiguous, each plane filled with grad/HW (avg) or zero but at the argmax.
template <typename x_t, typename g_t>
void frame_pool_backward_contiguous(const g_t* grad_out, const int32_t* argmax, x_t* grad_x,
                                    const FramePoolShape& s, FrameMode mode, bool batch_first) {
  using A = acc_t<x_t>;
  const int64_t HW = s.HW(), C = s.C;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (HW * C));
  at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const g_t* g = grad_out + out_row(s, batch_first, n) * C;
      for (int64_t c = 0; c < C; ++c) {
        x_t* plane = grad_x + (n * C + c) * HW;
        if (mode == FrameMode::Avg) {
          std::fill(plane, plane + HW, static_cast<x_t>(static_cast<A>(g[c]) / static_cast<A>(HW)));
        } else {
          std::fill(plane, plane + HW, x_t(0));
          plane[argmax[n * C + c]] = static_cast<x_t>(static_cast<A>(g[c]));
        }
      }
    }
  });
}

// grad_x: [N, HW, C] (channels_last). The gradient row of a frame is converted once, then copied
// to its HW rows (avg) or selected per channel by the argmax (max).
template <typename x_t, typename g_t>
void frame_pool_backward_channels_last(const g_t* grad_out, const int32_t* argmax, x_t* grad_x,
                                       const FramePoolShape& s, FrameMode mode, bool batch_first) {
  using A = acc_t<x_t>;
  const int64_t HW = s.HW(), C = s.C;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (HW * C));
  at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<x_t> row(C);
    for (int64_t n = begin; n < end; ++n) {
      const g_t* g = grad_out + out_row(s, batch_first, n) * C;
      x_t* frame = grad_x + n * HW * C;
      if (mode == FrameMode::Avg) {
        const A scale = A(1) / static_cast<A>(HW);
        for (int64_t c = 0; c < C; ++c) row[c] = static_cast<x_t>(static_cast<A>(g[c]) * scale);
        for (int64_t r = 0; r < HW; ++r) std::copy(row.begin(), row.end(), frame + r * C);
      } else {
        for (int64_t c = 0; c < C; ++c) row[c] = static_cast<x_t>(static_cast<A>(g[c]));
        const int32_t* idx = argmax + n * C;
        const x_t zero(0);
        for (int64_t r = 0; r < HW; ++r) {
          x_t* dst = frame + r * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = idx[c] == r ? row[c] : zero;
        }
      }
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
  int32_t* idx = mode == FrameMode::Max ? argmax.data_ptr<int32_t>() : nullptr;
  CNNLSTM_DISPATCH_POOLING_TYPES(xc.scalar_type(), "frame_pool_forward", [&] {
    using in_t = scalar_t;
    CNNLSTM_DISPATCH_POOLING_TYPES(odt, "frame_pool_forward", [&] {
      if (s.channels_last)
        frame_pool_forward_channels_last(xc.const_data_ptr<in_t>(), out.data_ptr<scalar_t>(), idx,
                                         s, mode, batch_first);
      else if (mode == FrameMode::Avg)
        frame_avg_pool_contiguous(xc.const_data_ptr<in_t>(), out.data_ptr<scalar_t>(), s, batch_first);
      else
        frame_max_pool_contiguous(xc.const_data_ptr<in_t>(), out.data_ptr<scalar_t>(), idx, s,
                                  batch_first);
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
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor idx = mode == FrameMode::Max ? argmax.contiguous() : argmax;
  const int32_t* idx_ptr = mode == FrameMode::Max ? idx.const_data_ptr<int32_t>() : nullptr;
  CNNLSTM_DISPATCH_POOLING_TYPES(x_dtype, "frame_pool_backward", [&] {
    using x_t = scalar_t;
    CNNLSTM_DISPATCH_POOLING_TYPES(g.scalar_type(), "frame_pool_backward", [&] {
      if (channels_last)
        frame_pool_backward_channels_last(g.const_data_ptr<scalar_t>(), idx_ptr,
                                          grad_x.data_ptr<x_t>(), s, mode, batch_first);
      else
        frame_pool_backward_contiguous(g.const_data_ptr<scalar_t>(), idx_ptr, grad_x.data_ptr<x_t>(),
                                       s, mode, batch_first);
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CPU, m) {
  m.impl("frame_pool_forward", &frame_pool_forward_cpu);
  m.impl("frame_pool_backward", &frame_pool_backward_cpu);
}

}  // namespace cnnlstm_ext::cpu
