// Autograd of lstm_layer_forward, for every device: the forward op wrapped in a
// torch::autograd::Function whose backward calls lstm_layer_backward. Registered here in C++
// rather than with torch.library.register_autograd, whose Python layer cost about 20 µs of host
// time per layer call without a graph and 80 µs with one (benchmarks/RESULTS.md, "The cost of an
// LSTM call"): host time bounds the GPU calls of the model's shape at small batches and in
// training.
// The fake (meta) kernels stay in cnnlstm_ext/ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace cnnlstm_ext::lstm_autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = std::optional<at::Tensor>;

// Typed handles of the ops, looked up once.
const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cnnlstm_ext::lstm_layer_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&,
              const at::Tensor&, const Opt&, bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cnnlstm_ext::lstm_layer_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&)>();
  return op;
}

class LstmLayerFunction : public torch::autograd::Function<LstmLayerFunction> {
 public:
  // x: [T, B, I], w_ih: [D, 4H, I], w_hh: [D, 4H, H], bias: [D, 4H] or None, h0, c0: [D, B, H]
  // -> y: [T, B, D*H], h_n, c_n: [D, B, H], gates: [T, B, D, 4H], cell: [T, B, D, H] (saved
  // activations, empty when train=False).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const Opt& bias, const at::Tensor& h0,
                               const at::Tensor& c0, const Opt& lengths, bool train) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n, c_n, gates, cell] = forward_op().call(x, w_ih, w_hh, bias, h0, c0, lengths, train);
    // Undefined tensors stand for None.
    ctx->save_for_backward({x, w_ih, w_hh, h0, c0, lengths.value_or(at::Tensor()), y, gates, cell});
    ctx->saved_data["has_bias"] = bias.has_value();
    // gates and cell are activations, not results: no gradient flows into them. Without
    // materialised grads autograd passes undefined tensors for them (and for unused results)
    // instead of zeros of their size ([T, B, D, 4H] and [T, B, D, H]) at the peak of backward.
    ctx->mark_non_differentiable({gates, cell});
    ctx->set_materialize_grads(false);
    return {y, h_n, c_n, gates, cell};
  }

  // grads: {grad_y, grad_h_n, grad_c_n, (unused) x2} -> one gradient per forward argument.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w_ih = s[1], &w_hh = s[2], &h0 = s[3], &c0 = s[4], &lengths = s[5];
    const at::Tensor &y = s[6], &gates = s[7], &cell = s[8];
    const auto given = [](const at::Tensor& g, const at::Tensor& like) {
      return g.defined() ? g.contiguous() : at::zeros_like(like);
    };
    auto [gx, gw_ih, gw_hh, gbias, gh0, gc0] = backward_op().call(
        given(grads[0], y), given(grads[1], h0), given(grads[2], c0), x, w_ih, w_hh, h0, c0,
        lengths.defined() ? Opt(lengths) : std::nullopt, y, gates, cell);
    if (!ctx->saved_data["has_bias"].toBool()) gbias = at::Tensor();
    return {gx, gw_ih, gw_hh, gbias, gh0, gc0, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_autograd(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& bias,
    const at::Tensor& h0, const at::Tensor& c0, const Opt& lengths, bool train) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || w_ih.requires_grad() || w_hh.requires_grad() ||
                           (bias && bias->requires_grad()) || h0.requires_grad() || c0.requires_grad());
  if (!needs_grad) {  // no node and no saved context, as torch.library.register_autograd does
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(x, w_ih, w_hh, bias, h0, c0, lengths, train);
  }
  const variable_list r = LstmLayerFunction::apply(x, w_ih, w_hh, bias, h0, c0, lengths, train);
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, Autograd, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_autograd);
}

}  // namespace cnnlstm_ext::lstm_autograd
