// Input checks and shapes shared by the CPU and CUDA implementations of the LSTM layer ops.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include <string>
#include <tuple>
#include <vector>

namespace cnnlstm_ext::lstm {

// Sizes of one LSTM layer call.
struct LstmDims {
  int64_t T;  // time steps
  int64_t B;  // batch
  int64_t I;  // input features
  int64_t H;  // hidden units per direction
  int64_t D;  // directions (1 or 2)
};

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_same(const at::Tensor& ref, const at::Tensor& t, const char* name,
                       const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", ref.scalar_type(),
              "; all floating tensors must share one dtype");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name,
                        const char* op) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ",
              shape_str(t));
}

inline void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, op, ": expected x of shape [T, B, I], got ", shape_str(x));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": expected x of dtype float32, float64, bfloat16 or float16, got ", dt);
}

// One layer's weights as the kernels take them, in x's dtype: w_ih [D, 4H, I], w_hh [D, 4H, H]
// (undefined unless stacked: the CUDA kernels take them so), per direction w_ih_d [4H, I],
// w_hh_d [4H, H] (the CPU kernels read each direction where it lies), and bias [D, 4H] =
// b_ih + b_hh (undefined without biases, or when not asked for); dtype is the dtype the weights
// were given in (their gradients are returned in it).
struct LayerWeights {
  at::Tensor w_ih, w_hh, bias;
  std::vector<at::Tensor> w_ih_d, w_hh_d;
  at::ScalarType dtype;
};

// Same-shaped tensors, one per direction, as one [D, shape] tensor: a view when they lie back to
// back in one storage (as FusedLSTM.flatten_parameters keeps them), a copy otherwise.
inline at::Tensor stack_directions(const std::vector<at::Tensor>& ts) {
  const at::Tensor& t0 = ts[0];
  bool adjacent = t0.is_contiguous();
  for (size_t k = 1; k < ts.size() && adjacent; ++k) {
    adjacent = ts[k].is_contiguous() && ts[k].is_alias_of(t0) &&
               ts[k].storage_offset() == t0.storage_offset() + static_cast<int64_t>(k) * t0.numel();
  }
  if (!adjacent) return at::stack(ts);
  std::vector<int64_t> sizes{static_cast<int64_t>(ts.size())}, strides{t0.numel()};
  sizes.insert(sizes.end(), t0.sizes().begin(), t0.sizes().end());
  strides.insert(strides.end(), t0.strides().begin(), t0.strides().end());
  return t0.as_strided(sizes, strides, t0.storage_offset());
}

// `weights` is one layer's slice of nn.LSTM's flat weights: per direction w_ih [4H, I],
// w_hh [4H, H], then b_ih and b_hh [4H] when the layer has biases. D = h0.size(0). They share one
// floating dtype; weights in another dtype than x's (float32 master weights with bfloat16
// activations, as under autocast) are cast to x's. With `stack`, w_ih and w_hh are also stacked
// (a view of directions stored back to back, else one copy per kind).
inline LayerWeights layer_weights(const char* op, const at::Tensor& x, at::TensorList weights,
                                  const at::Tensor& h0, bool with_bias, bool stack) {
  static const char* names[] = {"w_ih", "w_hh", "b_ih", "b_hh"};
  check_x(op, x);
  TORCH_CHECK(h0.dim() == 3, op, ": expected h0 of shape [D, B, H], got ", shape_str(h0));
  const int64_t D = h0.size(0), n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(D >= 1 && (n == 2 * D || n == 4 * D), op,
              ": expected weights to hold 2 tensors per direction (w_ih, w_hh) or 4 (w_ih, w_hh, "
              "b_ih, b_hh), for D = h0.size(0) = ", D, " directions; got ", n, " tensors");
  const int64_t per = n / D;
  std::vector<at::Tensor> kinds[4];
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t j = 0; j < per; ++j) {
      const at::Tensor& t = weights[d * per + j];
      if (t.device() != x.device() || t.scalar_type() != weights[0].scalar_type() ||
          t.sizes() != weights[j].sizes()) {  // the name is built only for the error
        const std::string name =
            c10::str("weights[", d * per + j, "] (", names[j], " of direction ", d, ")");
        TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device(), "; all tensors must be on one device");
        TORCH_CHECK(t.scalar_type() == weights[0].scalar_type(), op, ": ", name, " has dtype ",
                    t.scalar_type(), " but weights[0] has dtype ", weights[0].scalar_type(),
                    "; the weights must share one dtype");
        TORCH_CHECK(false, op, ": ", name, " has shape ", shape_str(t), " but direction 0's ",
                    names[j], " has shape ", shape_str(weights[j]));
      }
      kinds[j].push_back(t);
    }
  }
  const auto wdt = weights[0].scalar_type();
  TORCH_CHECK(at::isFloatingType(wdt), op, ": expected floating-point weights, got ", wdt);
  const auto in_x_dtype = [&](const at::Tensor& t) { return t.to(x.scalar_type()); };
  LayerWeights w;
  w.dtype = wdt;
  if (stack) {
    w.w_ih = in_x_dtype(stack_directions(kinds[0]));
    w.w_hh = in_x_dtype(stack_directions(kinds[1]));
  }
  for (int64_t d = 0; d < D; ++d) {
    w.w_ih_d.push_back(stack ? w.w_ih[d] : in_x_dtype(kinds[0][d]));
    w.w_hh_d.push_back(stack ? w.w_hh[d] : in_x_dtype(kinds[1][d]));
  }
  if (per == 4 && with_bias) {
    w.bias = in_x_dtype(stack_directions(kinds[2]) + stack_directions(kinds[3]));
  }
  return w;
}

// Checks the forward inputs and returns the sizes. w_ih, w_hh: direction 0's (layer_weights
// checked that every direction's match); D = h0.size(0). `lengths`, when given, must be int64 [B]
// on x's device; its values are range-checked where they can be read without a device sync (CPU).
inline LstmDims check_lstm_inputs(const char* op, const at::Tensor& x, const at::Tensor& w_ih,
                                  const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& h0, const at::Tensor& c0,
                                  const std::optional<at::Tensor>& lengths) {
  check_x(op, x);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0 && w_hh.size(0) == 4 * w_hh.size(1), op,
              ": expected each w_hh of shape [4H, H], got ", shape_str(w_hh));
  LstmDims d{x.size(0), x.size(1), x.size(2), w_hh.size(1), h0.size(0)};
  TORCH_CHECK(d.D == 1 || d.D == 2, op, ": expected 1 or 2 directions (h0.size(0)), got ", d.D);
  TORCH_CHECK(d.T > 0 && d.B > 0, op, ": expected x with T > 0 and B > 0, got ", shape_str(x));
  check_shape(w_ih, {4 * d.H, d.I}, "each w_ih", op);
  check_same(x, w_ih, "w_ih", op);
  check_same(x, w_hh, "w_hh", op);
  if (bias.has_value()) {
    check_shape(*bias, {d.D, 4 * d.H}, "bias", op);
    check_same(x, *bias, "bias", op);
  }
  check_shape(h0, {d.D, d.B, d.H}, "h0", op);
  check_shape(c0, {d.D, d.B, d.H}, "c0", op);
  check_same(x, h0, "h0", op);
  check_same(x, c0, "c0", op);
  if (lengths.has_value()) {
    const auto& L = *lengths;
    TORCH_CHECK(L.scalar_type() == at::kLong, op, ": expected lengths of dtype int64, got ",
                L.scalar_type());
    TORCH_CHECK(L.dim() == 1 && L.size(0) == d.B, op, ": expected lengths of shape [", d.B,
                "], got ", shape_str(L));
    TORCH_CHECK(L.device() == x.device(), op, ": lengths is on ", L.device(), " but x is on ",
                x.device());
    if (L.device().is_cpu()) {
      auto Lc = L.contiguous();
      const int64_t* p = Lc.data_ptr<int64_t>();
      for (int64_t b = 0; b < d.B; ++b) {
        TORCH_CHECK(p[b] >= 1 && p[b] <= d.T, op, ": lengths[", b, "] = ", p[b],
                    " is out of range; every length must be in [1, T=", d.T, "]");
      }
    }
  }
  return d;
}

// Arithmetic and the running cell state use the accumulation dtype (float32 for 16-bit inputs).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_lstm_backward_inputs(const char* op, const LstmDims& d, const at::Tensor& x,
                                       const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                                       const at::Tensor& grad_c_n, const at::Tensor& y,
                                       const at::Tensor& gates, const at::Tensor& cell) {
  TORCH_CHECK(gates.numel() > 0 && cell.numel() > 0, op,
              ": the forward ran with train=False and saved nothing for backward; run "
              "lstm_layer_forward with train=True to differentiate it");
  check_shape(grad_y, {d.T, d.B, d.D * d.H}, "grad_y", op);
  check_shape(grad_h_n, {d.D, d.B, d.H}, "grad_h_n", op);
  check_shape(grad_c_n, {d.D, d.B, d.H}, "grad_c_n", op);
  check_shape(y, {d.T, d.B, d.D * d.H}, "y", op);
  check_shape(gates, {d.T, d.B, d.D, 4 * d.H}, "gates", op);
  check_shape(cell, {d.T, d.B, d.D, d.H}, "cell", op);
  check_same(x, grad_y, "grad_y", op);
  check_same(x, grad_h_n, "grad_h_n", op);
  check_same(x, grad_c_n, "grad_c_n", op);
  check_same(x, y, "y", op);
  // Saved in x's dtype: for 16-bit inputs that halves the activation memory kept for backward,
  // at a rounding of the same order as the bfloat16/float16 outputs themselves.
  TORCH_CHECK(gates.scalar_type() == x.scalar_type() && cell.scalar_type() == x.scalar_type(), op,
              ": expected gates and cell of dtype ", x.scalar_type(), " (x's), got ",
              gates.scalar_type(), " and ", cell.scalar_type());
  TORCH_CHECK(gates.device() == x.device() && cell.device() == x.device(), op,
              ": gates and cell must be on x's device ", x.device());
}

// One checked call of lstm_layer_forward or lstm_layer_backward: what the CPU and CUDA kernels
// both take, filled once by lstm_forward_args / lstm_backward_args.
struct LstmLayerArgs {
  LstmDims d;
  at::Tensor w_ih;                    // [D, 4H, I] in x's dtype (with stack)
  at::Tensor w_hh;                    // [D, 4H, H] in x's dtype (with stack)
  std::vector<at::Tensor> w_ih_d;     // per direction [4H, I] in x's dtype
  std::vector<at::Tensor> w_hh_d;     // per direction [4H, H] in x's dtype
  std::optional<at::Tensor> bias;     // [D, 4H] = b_ih + b_hh in x's dtype (forward, with biases)
  at::ScalarType weight_dtype;        // the weights' own dtype, that of their gradients
};

inline LstmLayerArgs lstm_forward_args(const at::Tensor& x, at::TensorList weights,
                                       const at::Tensor& h0, const at::Tensor& c0,
                                       const std::optional<at::Tensor>& lengths, bool stack) {
  const char* op = "lstm_layer_forward";
  auto w = layer_weights(op, x, weights, h0, /*with_bias=*/true, stack);
  const auto bias = w.bias.defined() ? std::optional<at::Tensor>(w.bias) : std::nullopt;
  const auto d = check_lstm_inputs(op, x, w.w_ih_d[0], w.w_hh_d[0], bias, h0, c0, lengths);
  return {d, w.w_ih, w.w_hh, w.w_ih_d, w.w_hh_d, bias, w.dtype};
}

inline LstmLayerArgs lstm_backward_args(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                                        const at::Tensor& grad_c_n, const at::Tensor& x,
                                        at::TensorList weights, const at::Tensor& h0,
                                        const at::Tensor& c0,
                                        const std::optional<at::Tensor>& lengths,
                                        const at::Tensor& y, const at::Tensor& gates,
                                        const at::Tensor& cell, bool stack) {
  const char* op = "lstm_layer_backward";
  auto w = layer_weights(op, x, weights, h0, /*with_bias=*/false, stack);
  const auto d = check_lstm_inputs(op, x, w.w_ih_d[0], w.w_hh_d[0], std::nullopt, h0, c0,
                                   lengths);
  check_lstm_backward_inputs(op, d, x, grad_y, grad_h_n, grad_c_n, y, gates, cell);
  return {d, w.w_ih, w.w_hh, w.w_ih_d, w.w_hh_d, std::nullopt, w.dtype};
}

// grad_w_hh: [D, 4H, H] = sum over valid steps of dG[t, b, d]^T . h_prev[t, b, d], where h_prev is
// the state step t started from, without materialising h_prev ([T, B, D, H]): it is h0 at a
// sequence's first step and otherwise the output y one time step back in the direction's order.
//   dG: [T, B, D, 4H] (zero on padding), y: [T, B, D*H] (zero on padding), h0: [D, B, H],
//   lengths: [B] int64 on dG's device, or undefined (every sequence has T steps).
// Direction 0 starts at t = 0 and reads y[t - 1]; direction 1 starts at t = len - 1 and reads
// y[t + 1], which is zero padding at t = len - 1 (that step's state is h0, added apart).
// mm(out, a, b, accumulate) computes out = a . b (+ out): the caller's GEMM.
template <typename Matmul>
at::Tensor recurrent_weight_grad(const at::Tensor& dG, const at::Tensor& y, const at::Tensor& h0,
                                 const at::Tensor& lengths, Matmul mm) {
  const int64_t T = dG.size(0), B = dG.size(1), D = dG.size(2), G = dG.size(3), H = h0.size(2);
  auto grad = at::empty({D, G, H}, dG.options());
  auto y4 = y.view({T, B, D, H});
  for (int64_t d = 0; d < D; ++d) {
    auto out = grad[d];                 // [4H, H]
    auto dGd = dG.select(2, d);         // [T, B, 4H]
    auto yd = y4.select(2, d);          // [T, B, H]
    at::Tensor first;                   // [B, 4H]: each sequence's first step in this direction
    if (d == 0 || !lengths.defined()) {
      first = dGd[d == 0 ? 0 : T - 1];
    } else {
      first = dGd.index({lengths - 1, at::arange(B, lengths.options())});
    }
    mm(out, first.t(), h0[d], false);
    if (T > 1) {
      auto later = (d == 0 ? dGd.slice(0, 1, T) : dGd.slice(0, 0, T - 1)).flatten(0, 1);
      auto state = (d == 0 ? yd.slice(0, 0, T - 1) : yd.slice(0, 1, T)).flatten(0, 1);
      mm(out, later.t(), state, true);  // [4H, (T-1)B] x [(T-1)B, H]
    }
  }
  return grad;
}

// One layer step by step in differentiable ATen ops (lstm_steps.cpp): the semantics of
// lstm_layer_forward, and of lstm_layer_projected when each direction also has w_hr [P, H].
//   x: [T, B, I]; weights per direction w_ih, w_hh[, b_ih, b_hh][, w_hr];
//   h0: [D, B, P] (P = H without projections), c0: [D, B, H]; lengths: [B] int64 or undefined.
//   Returns y: [T, B, D*P] (zero past each length), h_n: [D, B, P], c_n: [D, B, H].
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_by_step_layer(const at::Tensor& x,
                                                                  at::TensorList weights,
                                                                  const at::Tensor& h0,
                                                                  const at::Tensor& c0,
                                                                  const at::Tensor& lengths);

}  // namespace cnnlstm_ext::lstm
