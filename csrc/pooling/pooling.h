// Argument checking, modes and output allocation of the pooling ops (frame_pool_*,
// temporal_pool_*), shared by the CPU (*_pool_cpu.cpp) and CUDA (*_pool_cuda.cu) kernels
// so that both devices refuse the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace cnnlstm_ext::pooling {

enum class FrameMode { Avg, Max };
enum class TemporalMode { Mean, Max, Last, Attention };

inline FrameMode parse_frame_mode(std::string_view mode) {
  if (mode == "avg") return FrameMode::Avg;
  if (mode == "max") return FrameMode::Max;
  TORCH_CHECK(false, "frame_pool: mode must be \"avg\" or \"max\", got \"", mode, "\"");
}

inline TemporalMode parse_temporal_mode(std::string_view mode) {
  if (mode == "mean") return TemporalMode::Mean;
  if (mode == "max") return TemporalMode::Max;
  if (mode == "last") return TemporalMode::Last;
  if (mode == "attention") return TemporalMode::Attention;
  TORCH_CHECK(false, "temporal_pool: mode must be \"mean\", \"max\", \"last\" or \"attention\", got \"",
              mode, "\"");
}

inline bool is_pooling_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_pooling_dtype(at::ScalarType t, const char* op, const char* what) {
  TORCH_CHECK(is_pooling_dtype(t), op, ": ", what,
              " must be float32, float64, bfloat16 or float16, got ", t);
}

// ---------------------------------------------------------------------------------------------
// frame_pool

// Sizes of one frame_pool call. Frame n = b*T + t of x: [N, C, H, W] goes to row
// t*B + b of out: [T, B, C], or row n of out: [B, T, C] when batch_first.
struct FramePoolShape {
  int64_t N, C, H, W, B, T;
  bool channels_last;  // x is stored [N, H, W, C]
  int64_t HW() const { return H * W; }
};

inline FramePoolShape frame_pool_shape(at::IntArrayRef x_size, int64_t batch_size, bool channels_last) {
  TORCH_CHECK(x_size.size() == 4, "frame_pool: x must be [B*T, C, h, w] (4-D), got ", x_size.size(),
              "-D shape ", x_size);
  TORCH_CHECK(batch_size >= 1, "frame_pool: batch_size must be >= 1, got ", batch_size);
  const int64_t N = x_size[0];
  TORCH_CHECK(N % batch_size == 0, "frame_pool: x must be [B*T, C, h, w] with B = batch_size = ",
              batch_size, ", but its first dimension ", N, " is not a multiple of it");
  TORCH_CHECK(x_size[1] >= 1 && x_size[2] >= 1 && x_size[3] >= 1,
              "frame_pool: x must be [B*T, C, h, w] with C, h, w >= 1, got shape ", x_size);
  return {N, x_size[1], x_size[2], x_size[3], batch_size, N / batch_size, channels_last};
}

// Whether the kernels read x as channels_last: contiguous wins when a tensor is both (C == 1 or
// h*w == 1). The backward is told the same layout (pooling_autograd.cpp).
inline bool frame_pool_reads_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Checks x and returns it in a layout the kernels read (contiguous or channels_last; any other
// strides are copied to contiguous first).
inline at::Tensor frame_pool_input(const at::Tensor& x, int64_t batch_size, FramePoolShape& shape) {
  check_pooling_dtype(x.scalar_type(), "frame_pool", "x");
  const bool channels_last = frame_pool_reads_channels_last(x);
  shape = frame_pool_shape(x.sizes(), batch_size, channels_last);
  return channels_last || x.is_contiguous() ? x : x.contiguous();
}

inline at::Tensor frame_pool_new_output(const FramePoolShape& s, bool batch_first,
                                        const at::TensorOptions& options) {
  return batch_first ? at::empty({s.B, s.T, s.C}, options) : at::empty({s.T, s.B, s.C}, options);
}

inline void check_frame_pool_grad(const at::Tensor& grad_out, const at::Tensor& argmax,
                                  const FramePoolShape& s, FrameMode mode, bool batch_first) {
  check_pooling_dtype(grad_out.scalar_type(), "frame_pool_backward", "grad_out");
  const std::vector<int64_t> expected =
      batch_first ? std::vector<int64_t>{s.B, s.T, s.C} : std::vector<int64_t>{s.T, s.B, s.C};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expected), "frame_pool_backward: grad_out must be ",
              batch_first ? "[B, T, C] = " : "[T, B, C] = ", at::IntArrayRef(expected), ", got ",
              grad_out.sizes());
  if (mode == FrameMode::Max) {
    TORCH_CHECK(argmax.scalar_type() == at::kInt && argmax.sizes() == at::IntArrayRef({s.N, s.C}),
                "frame_pool_backward: argmax must be int32 [N, C] = [", s.N, ", ", s.C,
                "] as returned by frame_pool_forward, got ", argmax.scalar_type(), " ",
                argmax.sizes());
    TORCH_CHECK(argmax.device() == grad_out.device(), "frame_pool_backward: argmax must be on ",
                grad_out.device(), " (grad_out's device), got ", argmax.device());
  }
}

// One checked call of frame_pool_forward, with its outputs allocated: what both devices' kernels
// take. out: [T, B, C] ([B, T, C] when batch_first) in out_dtype (x's by default); argmax: [N, C]
// int32 for "max", empty for "avg".
struct FramePoolCall {
  FrameMode mode;
  FramePoolShape s;
  at::Tensor x;  // contiguous or channels_last
  at::ScalarType out_dtype;
  at::Tensor out, argmax;
};

inline FramePoolCall frame_pool_call(const at::Tensor& x, int64_t batch_size,
                                     c10::string_view mode_name, bool batch_first,
                                     std::optional<at::ScalarType> out_dtype) {
  FramePoolCall c;
  c.mode = parse_frame_mode(mode_name);
  c.x = frame_pool_input(x, batch_size, c.s);
  c.out_dtype = out_dtype.value_or(x.scalar_type());
  check_pooling_dtype(c.out_dtype, "frame_pool", "out_dtype");
  c.out = frame_pool_new_output(c.s, batch_first, x.options().dtype(c.out_dtype));
  c.argmax = c.mode == FrameMode::Max ? at::empty({c.s.N, c.s.C}, x.options().dtype(at::kInt))
                                      : at::empty({0}, x.options().dtype(at::kInt));
  return c;
}

// One checked call of frame_pool_backward, with grad_x allocated (x_size, x_dtype, in x's layout).
struct FramePoolBackwardCall {
  FrameMode mode;
  FramePoolShape s;
  at::Tensor grad_x;
};

inline FramePoolBackwardCall frame_pool_backward_call(const at::Tensor& grad_out,
                                                      const at::Tensor& argmax,
                                                      at::IntArrayRef x_size,
                                                      at::ScalarType x_dtype, bool channels_last,
                                                      int64_t batch_size,
                                                      c10::string_view mode_name,
                                                      bool batch_first) {
  FramePoolBackwardCall c;
  c.mode = parse_frame_mode(mode_name);
  check_pooling_dtype(x_dtype, "frame_pool_backward", "x_dtype");
  c.s = frame_pool_shape(x_size, batch_size, channels_last);
  check_frame_pool_grad(grad_out, argmax, c.s, c.mode, batch_first);
  c.grad_x = at::empty(x_size, grad_out.options().dtype(x_dtype).memory_format(
                                   channels_last ? at::MemoryFormat::ChannelsLast
                                                 : at::MemoryFormat::Contiguous));
  return c;
}

// ---------------------------------------------------------------------------------------------
// temporal_pool

// Sizes and element strides of x: [T, B, D] (or [B, T, D]); the feature dimension is contiguous.
struct TemporalPoolShape {
  int64_t T, B, D;
  int64_t stride_t, stride_b;
};

// Checks x and returns it with a contiguous last dimension (copied when it is not).
inline at::Tensor temporal_pool_input(const at::Tensor& x, bool batch_first, TemporalPoolShape& s,
                                      const char* op = "temporal_pool") {
  TORCH_CHECK(x.dim() == 3, op, ": x must be ", batch_first ? "[B, T, D]" : "[T, B, D]",
              " (3-D), got ", x.dim(), "-D shape ", x.sizes());
  check_pooling_dtype(x.scalar_type(), op, "x");
  at::Tensor xc = x.stride(2) == 1 ? x : x.contiguous();
  const int tdim = batch_first ? 1 : 0, bdim = batch_first ? 0 : 1;
  s = {xc.size(tdim), xc.size(bdim), xc.size(2), xc.stride(tdim), xc.stride(bdim)};
  TORCH_CHECK(s.T >= 1, op, ": x must have at least one time step, got shape ", x.sizes());
  TORCH_CHECK(s.D >= 1, op, ": x must have at least one feature, got shape ", x.sizes());
  return xc;
}

// Validates lengths (int64 [B], values in [1, T]) and returns it contiguous on `device`, or an
// undefined tensor when there are none (every sequence has T valid steps). Values on the CPU are
// checked there and copied to the device without a synchronisation; values on a CUDA device are
// read back to the host (one small copy and a synchronisation) unless check_values is false,
// which the CUDA kernels pass while a CUDA graph is being captured (no synchronisation is allowed
// there) and in the backward (the forward checked the same lengths); the CUDA kernels clamp
// lengths to [1, T] so that they never read out of bounds.
inline at::Tensor temporal_pool_lengths(const std::optional<at::Tensor>& lengths, int64_t B, int64_t T,
                                        const at::Device& device, const char* op = "temporal_pool",
                                        bool check_values = true) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.scalar_type() == at::kLong, op, ": lengths must be int64, got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == B, op, ": lengths must be [B] = [", B, "], got shape ",
              l.sizes());
  TORCH_CHECK(l.device().is_cpu() || l.device() == device, op, ": lengths must be on the CPU or on ",
              device, " (x's device), got ", l.device());
  if (check_values && B > 0) {
    const at::Tensor host = l.device().is_cpu() ? l.contiguous() : l.to(at::kCPU);
    const int64_t* p = host.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(p[b] >= 1, op, ": lengths[", b, "] = ", p[b],
                  "; every length must be >= 1 (a sequence needs at least one valid step)");
      TORCH_CHECK(p[b] <= T, op, ": lengths[", b, "] = ", p[b], "; every length must be <= T = ", T,
                  " (x's time steps)");
    }
  }
  // non_blocking: a copy from the CPU need not wait for the device. From pageable memory the host
  // values are read before it returns; pinned lengths are copied first, so that a later write to
  // them cannot reach the transfer.
  const at::Tensor src = l.device().is_cpu() && device.is_cuda() && l.is_pinned() ? l.clone() : l;
  return src.to(device, at::kLong, /*non_blocking=*/true).contiguous();
}

struct ScoreParams {
  at::Tensor weight;  // [D], accumulation dtype, contiguous, on x's device
  at::Tensor bias;    // [1], accumulation dtype, or undefined
};

inline ScoreParams temporal_pool_score(const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& x,
                                       int64_t D, at::ScalarType acc_dtype,
                                       const char* op = "temporal_pool") {
  TORCH_CHECK(weight.has_value() && weight->defined(), op,
              ": mode \"attention\" needs score_weight [D] = [", D, "]");
  const at::Tensor& w = *weight;
  TORCH_CHECK(w.numel() == D && (w.dim() == 1 || (w.dim() == 2 && w.size(0) == 1)), op,
              ": score_weight must be [D] or [1, D] with D = ", D, ", got shape ", w.sizes());
  check_pooling_dtype(w.scalar_type(), op, "score_weight");
  TORCH_CHECK(w.device() == x.device(), op, ": score_weight must be on ", x.device(),
              " (x's device), got ", w.device());
  ScoreParams p;
  p.weight = w.reshape({D}).to(acc_dtype).contiguous();
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.numel() == 1, op, ": score_bias must have one element ([1]), got shape ", b.sizes());
    check_pooling_dtype(b.scalar_type(), op, "score_bias");
    TORCH_CHECK(b.device() == x.device(), op, ": score_bias must be on ", x.device(),
                " (x's device), got ", b.device());
    p.bias = b.reshape({1}).to(acc_dtype).contiguous();
  }
  return p;
}

inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_temporal_pool_grad(const at::Tensor& grad_out, const at::Tensor& aux,
                                     const TemporalPoolShape& s, TemporalMode mode,
                                     const at::Tensor& x) {
  const char* op = "temporal_pool_backward";
  check_pooling_dtype(grad_out.scalar_type(), op, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == s.B && grad_out.size(1) == s.D, op,
              ": grad_out must be [B, D] = [", s.B, ", ", s.D, "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out must be on ", x.device(),
              " (x's device), got ", grad_out.device());
  if (mode == TemporalMode::Max) {
    TORCH_CHECK(aux.scalar_type() == at::kInt && aux.dim() == 2 && aux.size(0) == s.B &&
                    aux.size(1) == s.D && aux.device() == x.device(),
                op, ": aux must be the int32 [B, D] = [", s.B, ", ", s.D, "] time indices on ",
                x.device(), " returned by temporal_pool_forward, got ", aux.scalar_type(), " ",
                aux.sizes(), " on ", aux.device());
  } else if (mode == TemporalMode::Attention) {
    TORCH_CHECK(aux.scalar_type() == accumulation_dtype(x.scalar_type()) && aux.dim() == 2 &&
                    aux.size(0) == s.B && aux.size(1) == s.T && aux.device() == x.device(),
                op, ": aux must be the ", accumulation_dtype(x.scalar_type()), " [B, T] = [", s.B,
                ", ", s.T, "] attention weights on ", x.device(),
                " returned by temporal_pool_forward, got ", aux.scalar_type(), " ", aux.sizes(),
                " on ", aux.device());
  }
}

// One checked call of temporal_pool_forward (op "temporal_pool") or temporal_pool_backward: what
// both devices' kernels take. check_length_values as in temporal_pool_lengths.
struct TemporalPoolCall {
  TemporalMode mode;
  TemporalPoolShape s;
  at::Tensor x;                // x with a contiguous last dimension
  at::Tensor lengths;          // [B] int64 on x's device, or undefined (all T)
  at::ScalarType acc_dtype;    // float32, or float64 for float64 x
  ScoreParams score;           // "attention" only
};

inline TemporalPoolCall temporal_pool_call(const char* op, const at::Tensor& x_in,
                                           const std::optional<at::Tensor>& lengths,
                                           c10::string_view mode_name, bool batch_first,
                                           bool bidirectional,
                                           const std::optional<at::Tensor>& score_weight,
                                           const std::optional<at::Tensor>& score_bias,
                                           bool check_length_values = true) {
  TemporalPoolCall a;
  a.mode = parse_temporal_mode(mode_name);
  a.x = temporal_pool_input(x_in, batch_first, a.s, op);
  TORCH_CHECK(!(bidirectional && a.mode == TemporalMode::Last && a.s.D % 2 != 0), op,
              ": bidirectional \"last\" needs an even feature size D (two directions), got D = ",
              a.s.D);
  a.lengths = temporal_pool_lengths(lengths, a.s.B, a.s.T, a.x.device(), op, check_length_values);
  a.acc_dtype = accumulation_dtype(a.x.scalar_type());
  if (a.mode == TemporalMode::Attention)
    a.score = temporal_pool_score(score_weight, score_bias, a.x, a.s.D, a.acc_dtype, op);
  return a;
}

// The forward's outputs, allocated: out [B, D] in x's dtype, and aux: the int32 [B, D] time
// indices of "max", the [B, T] attention weights in acc_dtype, else empty.
inline std::tuple<at::Tensor, at::Tensor> temporal_pool_new_outputs(const TemporalPoolCall& a) {
  const auto& s = a.s;
  at::Tensor out = at::empty({s.B, s.D}, a.x.options());
  at::Tensor aux;
  if (a.mode == TemporalMode::Max) aux = at::empty({s.B, s.D}, a.x.options().dtype(at::kInt));
  else if (a.mode == TemporalMode::Attention) aux = at::empty({s.B, s.T}, a.x.options().dtype(a.acc_dtype));
  else aux = at::empty({0}, a.x.options().dtype(at::kInt));
  return {out, aux};
}

// The attention score's gradients, accumulated in acc_dtype as flat tensors, in the dtypes and
// shapes of the score's parameters (an empty grad_b when the score has no bias).
inline void shape_score_grads(at::Tensor& grad_w, at::Tensor& grad_b, const at::Tensor& score_weight,
                              const std::optional<at::Tensor>& score_bias, const at::TensorOptions& acc) {
  grad_w = grad_w.to(score_weight.scalar_type()).reshape(score_weight.sizes());
  grad_b = score_bias.has_value() && score_bias->defined()
               ? grad_b.to(score_bias->scalar_type()).reshape(score_bias->sizes())
               : at::empty({0}, acc);
}

}  // namespace cnnlstm_ext::pooling
