// temporal_pool_forward / temporal_pool_backward on CUDA.
//
// x: [T, B, D] (or [B, T, D]; feature dimension contiguous) with lengths: [B] -> out: [B, D].
// Block = (sequence b, chunk of kLanes packs of V features); threadIdx.x walks the features with
// 16-byte accesses (coalesced across a warp), threadIdx.y splits the time steps (t = split,
// split + kSplits, ...), and the splits combine in shared memory in a fixed order. Only the valid
// steps t < lengths[b] are read. Attention adds one launch before the pooling: the scores
// x_t . w + bias, one warp per (b, t); the softmax statistics are formed per block from them.
// Backward writes grad_x once (zero on padding) with the same block layout; for attention, the
// weight gradient is summed per sequence in the same pass, then over sequences in a fixed order.
// No atomics: results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "pooling/pooling_cuda_memory.cuh"
#include "pooling/pooling.h"

namespace cnnlstm_ext::pooling {
namespace {


constexpr int kLanes = 32;   // threadIdx.x: packs of V features
constexpr int kSplits = 8;   // threadIdx.y: interleaved time steps
constexpr int kDotWarps = 8; // rows per block of the score kernel

struct TemporalParams {
  int64_t T, B, D, stride_t, stride_b;  // x's sizes and element strides
  const int64_t* lengths;                // [B] on the device, or nullptr (all T)
  bool bidirectional;
  // Clamped to [1, T]: lengths are validated on the host, except during CUDA graph capture.
  __device__ __forceinline__ int length(int64_t b) const {
    if (lengths == nullptr) return static_cast<int>(T);
    const int64_t L = lengths[b];
    return static_cast<int>(L < 1 ? 1 : (L > T ? T : L));
  }
  // Step that "last" reads for feature d: the reverse half of a bidirectional output ends at 0.
  __device__ __forceinline__ int last_step(int L, int64_t d) const {
    return (bidirectional && d >= D / 2) ? 0 : L - 1;
  }
};

// result[b, t] = x[t, b, :] . vec[b * vec_stride_b + :] (+ bias[0]) for t < lengths[b]; rows past
// the length are not written (never read). One warp per row.
//   x: [T, B, D] strided; vec: [D] (vec_stride_b = 0) or [B, D]; result: [B, T].
template <typename T, typename VT, int V>
__global__ void __launch_bounds__(kDotWarps * 32)
    temporal_row_dot_kernel(const T* __restrict__ x, const VT* __restrict__ vec, int64_t vec_stride_b,
                            const acc_t<T>* __restrict__ bias, acc_t<T>* __restrict__ result,
                            TemporalParams p) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDotWarps + threadIdx.x / 32;
  if (row >= p.B * p.T) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const int64_t b = row / p.T, t = row % p.T;
  if (t >= p.length(b)) return;
  const T* xr = x + t * p.stride_t + b * p.stride_b;
  const VT* vr = vec + b * vec_stride_b;
  A s = 0;
  for (int64_t d = static_cast<int64_t>(lane) * V; d < p.D; d += 32 * V) {
    const Pack<T, V> v = load_pack<T, V>(xr + d);
#pragma unroll
    for (int j = 0; j < V; ++j) s += to_acc(v.v[j]) * widen<A>(vr[d + j]);
  }
  s = warp_sum(s);
  if (lane == 0) result[row] = s + (bias ? bias[0] : A(0));
}

// out: [B, D] contiguous. argmax: [B, D] (max). attn: [B, T] (attention, written by chunk 0).
// scores: [B, T] from temporal_row_dot_kernel (attention).
template <typename T, TemporalMode kMode, int V>
__global__ void __launch_bounds__(kLanes * kSplits)
    temporal_pool_forward_kernel(const T* __restrict__ x, T* __restrict__ out, int32_t* __restrict__ argmax,
                                 acc_t<T>* __restrict__ attn, const acc_t<T>* __restrict__ scores,
                                 TemporalParams p, int chunks) {
  using A = acc_t<T>;
  constexpr bool kMax = kMode == TemporalMode::Max;
  constexpr bool kAttention = kMode == TemporalMode::Attention;
  __shared__ A part[kSplits][kLanes * V];
  __shared__ int part_index[kMax ? kSplits : 1][kLanes * V];
  __shared__ A softmax_stats[2];  // max score, sum of exp(score - max)
  const int64_t b = blockIdx.x / chunks;
  const int chunk = blockIdx.x % chunks;
  const int lane = threadIdx.x, split = threadIdx.y;
  const int64_t d = (static_cast<int64_t>(chunk) * kLanes + lane) * V;
  const bool active = d < p.D;
  const int L = p.length(b);
  const T* xb = x + b * p.stride_b + d;

  if constexpr (kMode == TemporalMode::Last) {
    if (split == 0 && active)
      store_pack<T, V>(out + b * p.D + d, load_pack<T, V>(xb + p.last_step(L, d) * p.stride_t));
    return;
  }

  const A* sb = kAttention ? scores + b * p.T : nullptr;
  if constexpr (kAttention) {
    if (split == 0) {  // one warp: softmax statistics over the valid steps
      A m = -INFINITY;
      for (int t = lane; t < L; t += 32) {
        const A v = sb[t];
        m = (v > m || v != v) ? v : m;
      }
      m = warp_max(m);
      A sum = 0;
      for (int t = lane; t < L; t += 32) sum += exp_acc(sb[t] - m);
      sum = warp_sum(sum);
      if (lane == 0) {
        softmax_stats[0] = m;
        softmax_stats[1] = sum;
      }
    }
    __syncthreads();
    if (chunk == 0) {
      const A m = softmax_stats[0], sum = softmax_stats[1];
      for (int t = split * kLanes + lane; t < p.T; t += kLanes * kSplits)
        attn[b * p.T + t] = t < L ? exp_acc(sb[t] - m) / sum : A(0);
    }
  }

  A acc[V];
  int idx[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc[j] = kMax ? static_cast<A>(-INFINITY) : A(0);
    idx[j] = kNoIndex;
  }
  if (active) {
    const A m = kAttention ? softmax_stats[0] : A(0);
    const A sum = kAttention ? softmax_stats[1] : A(1);
#pragma unroll 4
    for (int t = split; t < L; t += kSplits) {
      const Pack<T, V> v = load_pack<T, V>(xb + t * p.stride_t);
      const A weight = kAttention ? exp_acc(sb[t] - m) / sum : A(1);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A a = to_acc(v.v[j]);
        if constexpr (kMax) {
          if (precedes(a, t, acc[j], idx[j])) {
            acc[j] = a;
            idx[j] = t;
          }
        } else if constexpr (kAttention) {
          acc[j] += weight * a;
        } else {
          acc[j] += a;
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    part[split][lane * V + j] = acc[j];
    if constexpr (kMax) part_index[split][lane * V + j] = idx[j];
  }
  __syncthreads();
  if (split != 0 || !active) return;
  Pack<T, V> o;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    A r = part[0][lane * V + j];
    int ri = kMax ? part_index[0][lane * V + j] : 0;
    for (int sp = 1; sp < kSplits; ++sp) {  // fixed order: deterministic
      const A v = part[sp][lane * V + j];
      if constexpr (kMax) {
        const int vi = part_index[sp][lane * V + j];
        if (precedes(v, vi, r, ri)) {
          r = v;
          ri = vi;
        }
      } else {
        r += v;
      }
    }
    if constexpr (kMax) argmax[b * p.D + d + j] = ri;
    if constexpr (kMode == TemporalMode::Mean) r /= static_cast<A>(L);
    o.v[j] = static_cast<T>(r);
  }
  store_pack<T, V>(out + b * p.D + d, o);
}

// grad_out: [B, D] in x's dtype. grad_x: x's logical shape, contiguous (strides gs_t, gs_b).
// Attention: attn, gdots: [B, T] (weights and g . x_t), w: [D]; writes partial_w: [B, D] (sum over
// t of ds_t x_t) and partial_bias: [B] (sum over t of ds_t, by chunk 0).
template <typename T, TemporalMode kMode, int V>
__global__ void __launch_bounds__(kLanes * kSplits)
    temporal_pool_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                  const int32_t* __restrict__ argmax, const acc_t<T>* __restrict__ attn,
                                  const acc_t<T>* __restrict__ gdots, const acc_t<T>* __restrict__ w,
                                  T* __restrict__ grad_x, int64_t gs_t, int64_t gs_b,
                                  acc_t<T>* __restrict__ partial_w, acc_t<T>* __restrict__ partial_bias,
                                  TemporalParams p, int chunks) {
  using A = acc_t<T>;
  constexpr bool kAttention = kMode == TemporalMode::Attention;
  __shared__ A part[kAttention ? kSplits : 1][kLanes * V];
  __shared__ A g_dot_out;  // g . out_b = sum_t a_t (g . x_t)
  const int64_t b = blockIdx.x / chunks;
  const int chunk = blockIdx.x % chunks;
  const int lane = threadIdx.x, split = threadIdx.y;
  const int64_t d = (static_cast<int64_t>(chunk) * kLanes + lane) * V;
  const bool active = d < p.D;
  const int L = p.length(b);
  const A* ab = kAttention ? attn + b * p.T : nullptr;
  const A* gb = kAttention ? gdots + b * p.T : nullptr;

  if constexpr (kAttention) {
    if (split == 0) {
      A go = 0;
      for (int t = lane; t < L; t += 32) go += ab[t] * gb[t];
      go = warp_sum(go);
      if (chunk == 0) {  // d loss / d bias = sum_t ds_t
        A bias_sum = 0;
        for (int t = lane; t < L; t += 32) bias_sum += ab[t] * (gb[t] - go);
        bias_sum = warp_sum(bias_sum);
        if (lane == 0) partial_bias[b] = bias_sum;
      }
      if (lane == 0) g_dot_out = go;
    }
    __syncthreads();
  }

  A pw[V];
#pragma unroll
  for (int j = 0; j < V; ++j) pw[j] = 0;
  if (active) {
    A g[V], wv[V];
    int am[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      g[j] = to_acc(grad_out[b * p.D + d + j]);
      wv[j] = kAttention ? w[d + j] : A(0);
      am[j] = kMode == TemporalMode::Max ? argmax[b * p.D + d + j] : 0;
      // The arg-max must be a valid step: refused otherwise (an index from anywhere but the forward).
      if constexpr (kMode == TemporalMode::Max) CUDA_KERNEL_ASSERT(am[j] >= 0 && am[j] < L);
    }
    const int t_last = kMode == TemporalMode::Last ? p.last_step(L, d) : 0;
    const A go = kAttention ? g_dot_out : A(0);
    for (int t = split; t < p.T; t += kSplits) {
      Pack<T, V> o;
      if constexpr (kMode == TemporalMode::Mean) {
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = t < L ? static_cast<T>(g[j] / static_cast<A>(L)) : static_cast<T>(0);
      } else if constexpr (kMode == TemporalMode::Max) {
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = am[j] == t ? static_cast<T>(g[j]) : static_cast<T>(0);
      } else if constexpr (kMode == TemporalMode::Last) {
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = t == t_last ? static_cast<T>(g[j]) : static_cast<T>(0);
      } else {
        if (t < L) {
          // out_b = sum_t a_t x_t, a = softmax(s): ds_t = a_t (g . x_t - g . out_b).
          const A a_t = ab[t], ds_t = a_t * (gb[t] - go);
          const Pack<T, V> xv = load_pack<T, V>(x + t * p.stride_t + b * p.stride_b + d);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            o.v[j] = static_cast<T>(a_t * g[j] + ds_t * wv[j]);
            pw[j] += ds_t * to_acc(xv.v[j]);
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) o.v[j] = static_cast<T>(0);
        }
      }
      store_pack<T, V>(grad_x + t * gs_t + b * gs_b + d, o);
    }
  }
  if constexpr (kAttention) {
#pragma unroll
    for (int j = 0; j < V; ++j) part[split][lane * V + j] = pw[j];
    __syncthreads();
    if (split != 0 || !active) return;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A r = part[0][lane * V + j];
      for (int sp = 1; sp < kSplits; ++sp) r += part[sp][lane * V + j];  // fixed order
      partial_w[b * p.D + d + j] = r;
    }
  }
}

// grad_w[d] = sum_b partial_w[b, d]; grad_b[0] = sum_b partial_bias[b], in sequence order.
template <typename A>
__global__ void __launch_bounds__(256)
    sum_over_sequences_kernel(const A* __restrict__ partial_w, const A* __restrict__ partial_bias,
                              A* __restrict__ grad_w, A* __restrict__ grad_b, int64_t B, int64_t D) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d < D) {
    A s = 0;
    for (int64_t b = 0; b < B; ++b) s += partial_w[b * D + d];
    grad_w[d] = s;
  }
  if (d == 0 && grad_b != nullptr) {
    A s = 0;
    for (int64_t b = 0; b < B; ++b) s += partial_bias[b];
    grad_b[0] = s;
  }
}

template <typename T>
bool can_use_wide_access(const T* x, const TemporalPoolShape& s, TemporalMode mode, bool bidirectional) {
  constexpr int V = kVec16<T>;
  return is_aligned_16(x) && s.D % V == 0 && s.stride_t % V == 0 && s.stride_b % V == 0 &&
         !(mode == TemporalMode::Last && bidirectional && (s.D / 2) % V != 0);
}

int64_t feature_chunks(int64_t D, int V) {
  return (D + int64_t(kLanes) * V - 1) / (int64_t(kLanes) * V);
}

template <typename T, typename VT, int V>
void launch_row_dot(const T* x, const VT* vec, int64_t vec_stride_b, const acc_t<T>* bias, acc_t<T>* result,
                    const TemporalParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.B * p.T + kDotWarps - 1) / kDotWarps;
  TORCH_CHECK(blocks <= INT_MAX, "temporal_pool: too many time steps for one launch");
  temporal_row_dot_kernel<T, VT, V><<<static_cast<unsigned>(blocks), kDotWarps * 32, 0, stream>>>(
      x, vec, vec_stride_b, bias, result, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, TemporalMode kMode, int V>
void launch_forward(const T* x, T* out, int32_t* argmax, acc_t<T>* attn, const acc_t<T>* w,
                    const acc_t<T>* bias, acc_t<T>* scores, const TemporalParams& p, cudaStream_t stream) {
  if constexpr (kMode == TemporalMode::Attention) launch_row_dot<T, acc_t<T>, V>(x, w, 0, bias, scores, p, stream);
  const int64_t chunks = feature_chunks(p.D, V);
  const int64_t blocks = p.B * chunks;
  TORCH_CHECK(blocks <= INT_MAX, "temporal_pool: too many sequences for one launch");
  temporal_pool_forward_kernel<T, kMode, V><<<static_cast<unsigned>(blocks), dim3(kLanes, kSplits), 0, stream>>>(
      x, out, argmax, attn, scores, p, static_cast<int>(chunks));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, TemporalMode kMode, int V>
void launch_backward(const T* grad_out, const T* x, const int32_t* argmax, const acc_t<T>* attn,
                     acc_t<T>* gdots, const acc_t<T>* w, T* grad_x, int64_t gs_t, int64_t gs_b,
                     acc_t<T>* partial_w, acc_t<T>* partial_bias, const TemporalParams& p,
                     cudaStream_t stream) {
  if constexpr (kMode == TemporalMode::Attention)
    launch_row_dot<T, T, V>(x, grad_out, p.D, nullptr, gdots, p, stream);
  const int64_t chunks = feature_chunks(p.D, V);
  const int64_t blocks = p.B * chunks;
  TORCH_CHECK(blocks <= INT_MAX, "temporal_pool_backward: too many sequences for one launch");
  temporal_pool_backward_kernel<T, kMode, V><<<static_cast<unsigned>(blocks), dim3(kLanes, kSplits), 0, stream>>>(
      grad_out, x, argmax, attn, gdots, w, grad_x, gs_t, gs_b, partial_w, partial_bias, p,
      static_cast<int>(chunks));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// While a CUDA graph is captured, lengths on the device cannot be read back for validation.
bool capturing_graph() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Calls fn(std::integral_constant<TemporalMode, mode>, std::integral_constant<int, vector width>).
template <typename T, typename Fn>
void dispatch_mode_and_width(TemporalMode mode, bool wide, Fn&& fn) {
  auto with_mode = [&](auto m) {
    if (wide) fn(m, std::integral_constant<int, kVec16<T>>());
    else fn(m, std::integral_constant<int, 1>());
  };
  switch (mode) {
    case TemporalMode::Mean: with_mode(std::integral_constant<TemporalMode, TemporalMode::Mean>()); break;
    case TemporalMode::Max: with_mode(std::integral_constant<TemporalMode, TemporalMode::Max>()); break;
    case TemporalMode::Last: with_mode(std::integral_constant<TemporalMode, TemporalMode::Last>()); break;
    case TemporalMode::Attention:
      with_mode(std::integral_constant<TemporalMode, TemporalMode::Attention>());
      break;
  }
}

std::tuple<at::Tensor, at::Tensor> temporal_pool_forward_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& lengths_in, c10::string_view mode_name,
    bool batch_first, bool bidirectional, const std::optional<at::Tensor>& score_weight,
    const std::optional<at::Tensor>& score_bias) {
  TORCH_CHECK(x_in.is_cuda(), "temporal_pool: x must be a CUDA tensor here, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool capturing = capturing_graph();
  // A copy from the host cannot be captured safely: each replay would read that host memory again.
  TORCH_CHECK(!(capturing && lengths_in.has_value() && lengths_in->defined() && lengths_in->is_cpu()),
              "temporal_pool: while a CUDA graph is captured, lengths must already be on ", x_in.device(),
              " (a static input of the graph), got lengths on ", lengths_in->device());
  const TemporalPoolCall call = pooling::temporal_pool_call(
      "temporal_pool", x_in, lengths_in, mode_name, batch_first, bidirectional, score_weight,
      score_bias, /*check_length_values=*/!capturing);
  const TemporalMode mode = call.mode;
  const TemporalPoolShape& s = call.s;
  const at::Tensor& x = call.x;
  const at::Tensor& lengths = call.lengths;
  const at::ScalarType acc_dtype = call.acc_dtype;
  const pooling::ScoreParams& score = call.score;
  TORCH_CHECK(s.T <= INT_MAX / 2, "temporal_pool: T = ", s.T, " is too large");
  at::Tensor out, aux;
  std::tie(out, aux) = pooling::temporal_pool_new_outputs(call);
  if (s.B == 0) return {out, aux};

  const TemporalParams p{s.T, s.B, s.D, s.stride_t, s.stride_b,
                         lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr, bidirectional};
  at::Tensor scores = mode == TemporalMode::Attention ? at::empty({s.B, s.T}, x.options().dtype(acc_dtype))
                                                      : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "temporal_pool_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool wide = can_use_wide_access(xp, s, mode, bidirectional);
    dispatch_mode_and_width<scalar_t>(mode, wide, [&](auto m, auto v) {
      launch_forward<scalar_t, decltype(m)::value, decltype(v)::value>(
          xp, out.data_ptr<scalar_t>(), mode == TemporalMode::Max ? aux.data_ptr<int32_t>() : nullptr,
          mode == TemporalMode::Attention ? aux.data_ptr<A>() : nullptr,
          score.weight.defined() ? score.weight.const_data_ptr<A>() : nullptr,
          score.bias.defined() ? score.bias.const_data_ptr<A>() : nullptr,
          scores.defined() ? scores.data_ptr<A>() : nullptr, p, stream);
    });
  });
  return {out, aux};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_pool_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const std::optional<at::Tensor>& lengths_in,
    const at::Tensor& aux, c10::string_view mode_name, bool batch_first, bool bidirectional,
    const std::optional<at::Tensor>& score_weight, const std::optional<at::Tensor>& score_bias) {
  const char* op = "temporal_pool_backward";
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor here, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  // The forward has validated these lengths; reading them back again would cost a second
  // synchronisation per training step (the kernels clamp them to [1, T] regardless).
  const TemporalPoolCall call = pooling::temporal_pool_call(
      op, x_in, lengths_in, mode_name, batch_first, bidirectional, score_weight, score_bias,
      /*check_length_values=*/false);
  const TemporalMode mode = call.mode;
  const TemporalPoolShape& s = call.s;
  const at::Tensor& x = call.x;
  const at::Tensor& lengths = call.lengths;
  const at::ScalarType acc_dtype = call.acc_dtype;
  const pooling::ScoreParams& score = call.score;
  TORCH_CHECK(s.T <= INT_MAX / 2, op, ": T = ", s.T, " is too large");
  pooling::check_temporal_pool_grad(grad_out, aux, s, mode, x);

  at::Tensor grad_x = at::empty(x.sizes(), x.options());  // x's logical shape, contiguous
  const int64_t gs_t = grad_x.stride(batch_first ? 1 : 0), gs_b = grad_x.stride(batch_first ? 0 : 1);
  at::Tensor grad_w = at::empty({0}, x.options().dtype(acc_dtype));
  at::Tensor grad_b = at::empty({0}, x.options().dtype(acc_dtype));
  if (s.B == 0) {
    if (mode == TemporalMode::Attention) {
      grad_w = at::zeros(score_weight->sizes(), score_weight->options());
      if (score_bias.has_value() && score_bias->defined())
        grad_b = at::zeros(score_bias->sizes(), score_bias->options());
    }
    return {grad_x, grad_w, grad_b};
  }
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor aux_c = aux.contiguous();
  at::Tensor gdots, partial_w, partial_b;
  if (mode == TemporalMode::Attention) {
    gdots = at::empty({s.B, s.T}, x.options().dtype(acc_dtype));
    partial_w = at::empty({s.B, s.D}, x.options().dtype(acc_dtype));
    partial_b = at::empty({s.B}, x.options().dtype(acc_dtype));
    grad_w = at::empty({s.D}, x.options().dtype(acc_dtype));
    grad_b = at::empty({1}, x.options().dtype(acc_dtype));
  }
  const TemporalParams p{s.T, s.B, s.D, s.stride_t, s.stride_b,
                         lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr, bidirectional};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "temporal_pool_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool wide = can_use_wide_access(xp, s, mode, bidirectional);
    dispatch_mode_and_width<scalar_t>(mode, wide, [&](auto m, auto v) {
      launch_backward<scalar_t, decltype(m)::value, decltype(v)::value>(
          g.const_data_ptr<scalar_t>(), xp, mode == TemporalMode::Max ? aux_c.const_data_ptr<int32_t>() : nullptr,
          mode == TemporalMode::Attention ? aux_c.const_data_ptr<A>() : nullptr,
          gdots.defined() ? gdots.data_ptr<A>() : nullptr,
          score.weight.defined() ? score.weight.const_data_ptr<A>() : nullptr, grad_x.data_ptr<scalar_t>(),
          gs_t, gs_b, partial_w.defined() ? partial_w.data_ptr<A>() : nullptr,
          partial_b.defined() ? partial_b.data_ptr<A>() : nullptr, p, stream);
    });
    if (mode == TemporalMode::Attention) {
      sum_over_sequences_kernel<A><<<static_cast<unsigned>((s.D + 255) / 256), 256, 0, stream>>>(
          partial_w.const_data_ptr<A>(), partial_b.const_data_ptr<A>(), grad_w.data_ptr<A>(),
          grad_b.data_ptr<A>(), s.B, s.D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (mode == TemporalMode::Attention) {
    pooling::shape_score_grads(grad_w, grad_b, *score_weight, score_bias, x.options().dtype(acc_dtype));
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CUDA, m) {
  m.impl("temporal_pool_forward", &temporal_pool_forward_cuda);
  m.impl("temporal_pool_backward", &temporal_pool_backward_cuda);
}

}  // namespace cnnlstm_ext::pooling
