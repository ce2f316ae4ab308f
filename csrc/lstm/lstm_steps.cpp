// One LSTM layer step by step in differentiable ATen ops: the semantics of lstm_layer_forward,
// plus nn.LSTM's projections (proj_size > 0).
//
// Two users:
//  - lstm_layer_projected, the op of layers with projections, on every device: a
//    CompositeImplicitAutograd kernel, so autograd (double backward included), vmap, the fake
//    tensors of torch.compile/export and every dtype come from the ATen ops it is made of. The
//    fused kernels (CPU and CUDA, persistent and per-step) take layers without projections only.
//    Under torch.export the layer is lstm_layer_projected_export, the same kernel as one node.
//  - the autograd of lstm_layer_forward (lstm_autograd.cpp), for what the fused backward cannot
//    serve: gradients that are themselves differentiable (create_graph=True) and batched
//    gradients (is_grads_batched=True, vmap over the backward).
#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "lstm.h"

namespace cnnlstm_ext::lstm {

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_by_step_layer(const at::Tensor& x,
                                                                  at::TensorList weights,
                                                                  const at::Tensor& h0,
                                                                  const at::Tensor& c0,
                                                                  const at::Tensor& lengths) {
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 3 && c0.dim() == 3,
              "lstm_layer: expected x [T, B, I], h0 [D, B, P or H], c0 [D, B, H]; got x ",
              x.sizes(), ", h0 ", h0.sizes(), ", c0 ", c0.sizes());
  const int64_t D = h0.sym_size(0).guard_int(__FILE__, __LINE__);  // (size() would fix B too)
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(D >= 1 && n % D == 0 && n / D >= 2 && n / D <= 5,
              "lstm_layer: expected per direction w_ih, w_hh[, b_ih, b_hh][, w_hr] (2 to 5 "
              "tensors) for D = h0.size(0) = ", D, " directions; got ", n, " tensors");
  // Per direction: 2 (w_ih, w_hh), 3 (+ w_hr), 4 (+ biases) or 5 (+ biases, w_hr), as in
  // nn.LSTM's flat weights.
  const int64_t per = n / D;
  const bool biased = per >= 4, projected = per == 3 || per == 5;
  // A loop over steps: under torch.export a symbolic T becomes the traced one (as nn.LSTM's).
  const int64_t T = x.sym_size(0).guard_int(__FILE__, __LINE__);
  const c10::SymInt B = x.sym_size(1);
  const auto long_options = x.options().dtype(at::kLong);
  // [T, B] per-sequence validity of each step, and for the reverse direction the time each step
  // reads (sequence b runs backwards from lengths[b] - 1).
  const at::Tensor steps = at::arange(T, long_options).unsqueeze(1);                 // [T, 1]
  const at::Tensor len = lengths.defined() ? lengths.to(long_options).unsqueeze(0)   // [1, B]
                                           : at::full_symint({1, B}, T, long_options);
  const at::Tensor valid = (steps < len).unsqueeze(2);                               // [T, B, 1]
  const at::Tensor reversed = (len - 1 - steps).clamp_min(0);                        // [T, B]
  std::vector<at::Tensor> ys, hs, cs;
  for (int64_t d = 0; d < D; ++d) {
    const auto w = [&](int64_t k) { return weights[d * per + k].to(x.scalar_type()); };
    const at::Tensor w_ih = w(0), w_hh = w(1);                     // [4H, I], [4H, P or H]
    const at::Tensor w_hr = projected ? w(per - 1) : at::Tensor();  // [P, H]
    at::Tensor xw = at::matmul(x, w_ih.t());                        // [T, B, 4H], one GEMM
    if (biased) xw = xw + (w(2) + w(3));
    const auto in_time = [&](const at::Tensor& t) {                 // [T, B, K] in step order
      return at::gather(t, 0, reversed.unsqueeze(2).expand_symint(t.sym_sizes()));
    };
    if (d == 1) xw = in_time(xw);
    at::Tensor h = h0[d], c = c0[d];                                // [B, P or H], [B, H]
    std::vector<at::Tensor> out;
    for (int64_t s = 0; s < T; ++s) {
      const auto g = (xw[s] + at::matmul(h, w_hh.t())).chunk(4, 1);  // i, f, g, o: [B, H]
      const at::Tensor c_new = at::sigmoid(g[1]) * c + at::sigmoid(g[0]) * at::tanh(g[2]);
      at::Tensor h_new = at::sigmoid(g[3]) * at::tanh(c_new);
      if (projected) h_new = at::matmul(h_new, w_hr.t());
      const at::Tensor v = valid[s];                                // [B, 1]
      c = at::where(v, c_new, c);
      h = at::where(v, h_new, h);
      out.push_back(h_new);
    }
    at::Tensor y = at::stack(out);                                  // [T, B, P or H] by step
    if (d == 1) y = in_time(y);                                     // ... by time
    ys.push_back(at::where(valid, y, at::zeros_like(y)));
    hs.push_back(h);
    cs.push_back(c);
  }
  return {at::cat(ys, 2), at::stack(hs), at::stack(cs)};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_projected(
    const at::Tensor& x, at::TensorList weights, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths) {
  const int64_t D = h0.dim() == 3 ? h0.sym_size(0).guard_int(__FILE__, __LINE__) : 0;
  const int64_t per = D > 0 ? static_cast<int64_t>(weights.size()) / D : 0;
  TORCH_CHECK(D > 0 && (per == 3 || per == 5) && per * D == static_cast<int64_t>(weights.size()),
              "lstm_layer_projected: expected per direction w_ih, w_hh[, b_ih, b_hh], w_hr (3 or "
              "5 tensors) for D = h0.size(0) directions; got ", weights.size(),
              " tensors with h0 of shape ", h0.sizes());
  const at::Tensor& w_hr = weights[per - 1];
  TORCH_CHECK(w_hr.dim() == 2 && h0.sym_size(2) == w_hr.sym_size(0) &&
                  c0.dim() == 3 && c0.sym_size(2) == w_hr.sym_size(1),
              "lstm_layer_projected: expected w_hr [P, H], h0 [D, B, P], c0 [D, B, H]; got w_hr ",
              w_hr.sym_sizes(), ", h0 ", h0.sym_sizes(), ", c0 ", c0.sym_sizes());
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 &&
                    lengths->sym_size(0) == x.sym_size(1) && lengths->device() == x.device(),
                "lstm_layer_projected: lengths must be int64 of shape [B] = [", x.sym_size(1),
                "] on ", x.device(), "; got ", lengths->scalar_type(), " of shape ",
                lengths->sym_sizes(), " on ", lengths->device());
  }
  for (const auto& t : {h0, c0}) {
    TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(),
                "lstm_layer_projected: h0 and c0 must have x's device and dtype (", x.device(),
                ", ", x.scalar_type(), "); got ", t.device(), ", ", t.scalar_type());
  }
  return step_by_step_layer(x, weights, h0, c0, lengths.value_or(at::Tensor()));
}

// The export op runs the same ATen ops below autograd on every device (its autograd and fake
// kernel: ops.py), in x's dtype as its fake kernel says: autocast, which the composite op's
// matmuls would follow, is off inside (the layer's caller casts, as ops.lstm_layer does).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_projected_export(
    const at::Tensor& x, at::TensorList weights, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return lstm_layer_projected(x, weights, h0, c0, lengths);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CompositeImplicitAutograd, m) {
  m.impl("lstm_layer_projected", &lstm_layer_projected);
}

TORCH_LIBRARY_IMPL(cnnlstm_ext, CompositeExplicitAutograd, m) {
  m.impl("lstm_layer_projected_export", &lstm_layer_projected_export);
}

}  // namespace cnnlstm_ext::lstm
