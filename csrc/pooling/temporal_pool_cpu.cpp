// temporal_pool_forward / temporal_pool_backward on the CPU.
//
// x: [T, B, D] (or [B, T, D]; feature dimension contiguous, time and batch strided) with
// lengths: [B] -> out: [B, D], reading only the valid steps t < lengths[b]. Backward writes
// grad_x: [T, B, D] (or [B, T, D]) once, zero on padding. Sums run in float (double for double).
// Parallel over (sequence, feature block) or over sequences; the attention weight gradient is
// summed over sequences in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "pooling/pooling_cpu_reduce.h"
#include "pooling/pooling.h"

namespace cnnlstm_ext::pooling {
namespace {


// Features per task for the (sequence, feature block) parallel loops.
constexpr int64_t kFeatureBlock = 256;

struct TemporalPoolArgs {
  TemporalPoolShape s;
  const int64_t* lengths;  // [B] or nullptr (all T)
  TemporalMode mode;
  bool bidirectional;
  int64_t length(int64_t b) const { return lengths ? lengths[b] : s.T; }
  // Time step that "last" reads for feature d of sequence b.
  int64_t last_step(int64_t b, int64_t d) const {
    return (bidirectional && d >= s.D / 2) ? 0 : length(b) - 1;
  }
};

// out: [B, D] contiguous. argmax: [B, D] (max). attn: [B, T] (attention).
// w: [D], bias: [1] or nullptr, both in the accumulation type (attention).
template <typename T>
void temporal_pool_forward_kernel(const T* x, T* out, int32_t* argmax, acc_t<T>* attn,
                                  const acc_t<T>* w, const acc_t<T>* bias, const TemporalPoolArgs& a) {
  using A = acc_t<T>;
  const TemporalPoolShape& s = a.s;
  const int64_t D = s.D;
  if (a.mode == TemporalMode::Attention) {
    at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> acc(D);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t L = a.length(b);
        const T* xb = x + b * s.stride_b;
        A* wt = attn + b * s.T;
        // Masked softmax over the valid steps of x_t . w + bias.
        A max_score = -std::numeric_limits<A>::infinity();
        for (int64_t t = 0; t < L; ++t) {
          wt[t] = dot(xb + t * s.stride_t, w, D) + (bias ? bias[0] : A(0));
          max_score = std::max(max_score, wt[t]);
        }
        A total = 0;
        for (int64_t t = 0; t < L; ++t) {
          wt[t] = std::exp(wt[t] - max_score);
          total += wt[t];
        }
        for (int64_t t = 0; t < L; ++t) wt[t] /= total;
        for (int64_t t = L; t < s.T; ++t) wt[t] = 0;
        weighted_sum_rows(xb, s.stride_t, L, wt, D, acc.data());
        for (int64_t d = 0; d < D; ++d) out[b * D + d] = static_cast<T>(acc[d]);
      }
    });
    return;
  }
  const int64_t blocks = (D + kFeatureBlock - 1) / kFeatureBlock;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (s.T * kFeatureBlock));
  at::parallel_for(0, s.B * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(kFeatureBlock);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks, d0 = (i % blocks) * kFeatureBlock;
      const int64_t n = std::min(kFeatureBlock, D - d0), L = a.length(b);
      const T* xb = x + b * s.stride_b + d0;
      T* o = out + b * D + d0;
      switch (a.mode) {
        case TemporalMode::Mean:
          sum_rows(xb, s.stride_t, L, n, acc.data());
          for (int64_t d = 0; d < n; ++d) o[d] = static_cast<T>(acc[d] / static_cast<A>(L));
          break;
        case TemporalMode::Max:
          max_rows(xb, s.stride_t, L, n, acc.data(), argmax + b * D + d0);
          for (int64_t d = 0; d < n; ++d) o[d] = static_cast<T>(acc[d]);
          break;
        case TemporalMode::Last:
          for (int64_t d = 0; d < n; ++d) o[d] = xb[a.last_step(b, d0 + d) * s.stride_t + d];
          break;
        case TemporalMode::Attention:
          break;
      }
    }
  });
}

// grad_out: [B, D] accumulation type. grad_x: strides gs_t, gs_b (contiguous [T, B, D] or
// [B, T, D]). For attention, also partial_w: [B, D] and partial_bias: [B] (per-sequence parts
// of the score gradients, summed over sequences by the caller).
template <typename T>
void temporal_pool_backward_kernel(const acc_t<T>* grad_out, const T* x, const int32_t* argmax,
                                   const acc_t<T>* attn, const acc_t<T>* w, T* grad_x, int64_t gs_t,
                                   int64_t gs_b, acc_t<T>* partial_w, acc_t<T>* partial_bias,
                                   const TemporalPoolArgs& a) {
  using A = acc_t<T>;
  const TemporalPoolShape& s = a.s;
  const int64_t D = s.D, Tn = s.T;
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> row(D);
    std::vector<A> ds(a.mode == TemporalMode::Attention ? Tn : 0);
    const T zero(0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = a.length(b);
      const A* g = grad_out + b * D;
      T* gx = grad_x + b * gs_b;
      switch (a.mode) {
        case TemporalMode::Mean: {
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(g[d] / static_cast<A>(L));
          for (int64_t t = 0; t < Tn; ++t) {
            T* dst = gx + t * gs_t;
            if (t < L) std::copy(row.begin(), row.end(), dst);
            else std::fill(dst, dst + D, zero);
          }
          break;
        }
        case TemporalMode::Max: {
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(g[d]);
          const int32_t* idx = argmax + b * D;
          for (int64_t d = 0; d < D; ++d) {
            TORCH_CHECK(idx[d] >= 0 && idx[d] < L, "temporal_pool_backward: aux[", b, ", ", d, "] = ",
                        idx[d], " is not a valid step of sequence ", b, " (steps 0 to ", L - 1,
                        "); aux must be the arg-max returned by temporal_pool_forward");
          }
          for (int64_t t = 0; t < Tn; ++t) {
            T* dst = gx + t * gs_t;
            for (int64_t d = 0; d < D; ++d) dst[d] = idx[d] == t ? row[d] : zero;
          }
          break;
        }
        case TemporalMode::Last: {
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(g[d]);
          const int64_t split = a.bidirectional ? D / 2 : D;  // [0, split) from L-1, rest from 0
          for (int64_t t = 0; t < Tn; ++t) {
            T* dst = gx + t * gs_t;
            std::fill(dst, dst + D, zero);
            if (t == L - 1) std::copy(row.begin(), row.begin() + split, dst);
            if (t == 0) std::copy(row.begin() + split, row.end(), dst + split);
          }
          break;
        }
        case TemporalMode::Attention: {
          // out_b = sum_t a_t x_t with a = softmax(s); ds_t = a_t (g . x_t - g . out_b).
          const T* xb = x + b * s.stride_b;
          const A* at_b = attn + b * Tn;
          A g_out = 0;
          for (int64_t t = 0; t < L; ++t) {
            ds[t] = dot(xb + t * s.stride_t, g, D);
            g_out += at_b[t] * ds[t];
          }
          A bias_sum = 0;
          for (int64_t t = 0; t < L; ++t) {
            ds[t] = at_b[t] * (ds[t] - g_out);
            bias_sum += ds[t];
          }
          for (int64_t t = 0; t < Tn; ++t) {
            T* dst = gx + t * gs_t;
            if (t < L) {
              const A weight_t = at_b[t], ds_t = ds[t];
              for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(weight_t * g[d] + ds_t * w[d]);
            } else {
              std::fill(dst, dst + D, zero);
            }
          }
          weighted_sum_rows(xb, s.stride_t, L, ds.data(), D, partial_w + b * D);
          partial_bias[b] = bias_sum;
          break;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> temporal_pool_forward_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& lengths_in, c10::string_view mode_name,
    bool batch_first, bool bidirectional, const std::optional<at::Tensor>& score_weight,
    const std::optional<at::Tensor>& score_bias) {
  TORCH_CHECK(x_in.device().is_cpu(), "temporal_pool: x must be a CPU tensor here, got ", x_in.device());
  const TemporalPoolCall call = pooling::temporal_pool_call(
      "temporal_pool", x_in, lengths_in, mode_name, batch_first, bidirectional, score_weight,
      score_bias);
  const TemporalMode mode = call.mode;
  const TemporalPoolShape& s = call.s;
  const at::Tensor& x = call.x;
  const at::Tensor& lengths = call.lengths;
  const at::ScalarType acc_dtype = call.acc_dtype;
  const pooling::ScoreParams& score = call.score;
  at::Tensor out, aux;
  std::tie(out, aux) = pooling::temporal_pool_new_outputs(call);
  if (s.B == 0) return {out, aux};

  const TemporalPoolArgs args{s, lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr, mode,
                              bidirectional};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "temporal_pool_forward", [&] {
    using A = acc_t<scalar_t>;
    temporal_pool_forward_kernel<scalar_t>(
        x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        mode == TemporalMode::Max ? aux.data_ptr<int32_t>() : nullptr,
        mode == TemporalMode::Attention ? aux.data_ptr<A>() : nullptr,
        score.weight.defined() ? score.weight.const_data_ptr<A>() : nullptr,
        score.bias.defined() ? score.bias.const_data_ptr<A>() : nullptr, args);
  });
  return {out, aux};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const std::optional<at::Tensor>& lengths_in,
    const at::Tensor& aux, c10::string_view mode_name, bool batch_first, bool bidirectional,
    const std::optional<at::Tensor>& score_weight, const std::optional<at::Tensor>& score_bias) {
  const char* op = "temporal_pool_backward";
  TORCH_CHECK(x_in.device().is_cpu(), op, ": x must be a CPU tensor here, got ", x_in.device());
  const TemporalPoolCall call = pooling::temporal_pool_call(
      op, x_in, lengths_in, mode_name, batch_first, bidirectional, score_weight, score_bias);
  const TemporalMode mode = call.mode;
  const TemporalPoolShape& s = call.s;
  const at::Tensor& x = call.x;
  const at::Tensor& lengths = call.lengths;
  const at::ScalarType acc_dtype = call.acc_dtype;
  const pooling::ScoreParams& score = call.score;
  pooling::check_temporal_pool_grad(grad_out, aux, s, mode, x);

  // grad_x in x's logical shape, contiguous.
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const int64_t gs_t = grad_x.stride(batch_first ? 1 : 0), gs_b = grad_x.stride(batch_first ? 0 : 1);
  at::Tensor grad_w = at::empty({0}, x.options().dtype(acc_dtype));
  at::Tensor grad_b = at::empty({0}, x.options().dtype(acc_dtype));
  at::Tensor partial_w, partial_b;
  if (mode == TemporalMode::Attention) {
    partial_w = at::empty({s.B, s.D}, x.options().dtype(acc_dtype));
    partial_b = at::empty({s.B}, x.options().dtype(acc_dtype));
  }
  if (s.B > 0) {
    const at::Tensor g = grad_out.to(acc_dtype).contiguous();
    const at::Tensor aux_c = aux.contiguous();
    const TemporalPoolArgs args{s, lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr, mode,
                                bidirectional};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "temporal_pool_backward", [&] {
      using A = acc_t<scalar_t>;
      temporal_pool_backward_kernel<scalar_t>(
          g.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(),
          mode == TemporalMode::Max ? aux_c.const_data_ptr<int32_t>() : nullptr,
          mode == TemporalMode::Attention ? aux_c.const_data_ptr<A>() : nullptr,
          score.weight.defined() ? score.weight.const_data_ptr<A>() : nullptr,
          grad_x.data_ptr<scalar_t>(), gs_t, gs_b,
          partial_w.defined() ? partial_w.data_ptr<A>() : nullptr,
          partial_b.defined() ? partial_b.data_ptr<A>() : nullptr, args);
    });
  }
  if (mode == TemporalMode::Attention) {
    // Sum the per-sequence parts in sequence order (deterministic, thread-count independent).
    grad_w = at::zeros({s.D}, x.options().dtype(acc_dtype));
    grad_b = at::zeros({1}, x.options().dtype(acc_dtype));
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "temporal_pool_backward_score", [&] {
      const scalar_t* pw = partial_w.const_data_ptr<scalar_t>();
      scalar_t* gw = grad_w.data_ptr<scalar_t>();
      const int64_t D = s.D, B = s.B;
      at::parallel_for(0, D, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t b = 0; b < B; ++b)
          for (int64_t d = begin; d < end; ++d) gw[d] += pw[b * D + d];
      });
      scalar_t* gb = grad_b.data_ptr<scalar_t>();
      const scalar_t* pb = partial_b.const_data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) gb[0] += pb[b];
    });
    pooling::shape_score_grads(grad_w, grad_b, *score_weight, score_bias, x.options().dtype(acc_dtype));
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CPU, m) {
  m.impl("temporal_pool_forward", &temporal_pool_forward_cpu);
  m.impl("temporal_pool_backward", &temporal_pool_backward_cpu);
}

}  // namespace cnnlstm_ext::pooling
