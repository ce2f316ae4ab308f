// Autograd of the LSTM op, for every device: lstm_layer_forward wrapped in a
// torch::autograd::Function whose backward calls lstm_layer_backward (which itself refuses to be
// differentiated, with a clear error). Registered here in C++
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
#include <vector>

#include "autograd_graph.h"
#include "lstm.h"

namespace cnnlstm_ext::lstm {
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
              const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&, const Opt&,
              bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cnnlstm_ext::lstm_layer_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
              const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, bool)>();
  return op;
}

class LstmLayerFunction : public torch::autograd::Function<LstmLayerFunction> {
 public:
  // x: [T, B, I], weights: per direction w_ih [4H, I], w_hh [4H, H] (, b_ih, b_hh [4H]),
  // h0, c0: [D, B, H] -> y: [T, B, D*H], h_n, c_n: [D, B, H], gates: [T, B, D, 4H],
  // cell: [T, B, D, H] (saved activations, empty when train=False).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               const at::Tensor& h0, const at::Tensor& c0, const Opt& lengths,
                               bool train) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n, c_n, gates, cell] = forward_op().call(x, weights, h0, c0, lengths, train);
    // Saved as given, so that autograd's version check catches an in-place change before
    // backward; undefined tensors stand for None.
    variable_list saved{x, h0, c0, lengths.value_or(at::Tensor()), y, gates, cell};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    // gates and cell are activations, not results: no gradient flows into them. Without
    // materialised grads autograd passes undefined tensors for them (and for unused results)
    // instead of zeros of their size ([T, B, D, 4H] and [T, B, D, H]) at the peak of backward.
    ctx->mark_non_differentiable({gates, cell});
    ctx->set_materialize_grads(false);
    return {y, h_n, c_n, gates, cell};
  }

  // The gradients of step_by_step_layer's outputs against grad_outputs: one per forward
  // argument, as backward returns them (undefined where none is needed). With create_graph they
  // have a graph of their own (double backward); grad_outputs may be batched tensors of a vmap.
  static variable_list step_by_step_gradients(const at::Tensor& x, at::TensorList weights,
                                              const at::Tensor& h0, const at::Tensor& c0,
                                              const at::Tensor& lengths,
                                              const variable_list& grad_outputs,
                                              bool create_graph) {
    variable_list args{x};
    args.insert(args.end(), weights.begin(), weights.end());
    args.insert(args.end(), {h0, c0});
    variable_list inputs;
    for (const auto& a : args) {
      if (a.requires_grad()) inputs.push_back(a);
    }
    variable_list out(args.size() + 2);  // + lengths, train
    if (inputs.empty()) return out;
    at::AutoGradMode grad_mode(true);  // the layer is recomputed with a graph
    auto [y, h_n, c_n] = step_by_step_layer(x, weights, h0, c0, lengths);
    const variable_list g = torch::autograd::grad({y, h_n, c_n}, inputs, grad_outputs,
                                                  /*retain_graph=*/create_graph, create_graph,
                                                  /*allow_unused=*/true);
    for (size_t i = 0, k = 0; i < args.size(); ++i) {
      if (args[i].requires_grad()) out[i] = g[k++];
    }
    return out;
  }

  // Whether t is a batched tensor of vmap (torch.func.vmap, or the one under
  // is_grads_batched=True and jacobian(vectorize=True)).
  static bool batched(const at::Tensor& t) {
    return t.defined() && (t.key_set().has(c10::DispatchKey::Batched) ||
                           t.key_set().has(c10::DispatchKey::FuncTorchBatched));
  }

  // grads: {grad_y, grad_h_n, grad_c_n, (unused) x2} -> one gradient per forward argument:
  // x, each weight, h0, c0, lengths, train.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &h0 = s[1], &c0 = s[2], &lengths = s[3], &y = s[4];
    const at::TensorList weights(s.data() + 7, s.size() - 7);
    const auto given = [](const at::Tensor& g, const at::Tensor& like) {
      return g.defined() ? g.contiguous() : at::zeros_like(like);
    };
    const bool create_graph = at::GradMode::is_enabled();
    if (create_graph || batched(grads[0]) || batched(grads[1]) || batched(grads[2])) {
      // create_graph=True (a gradient penalty, gradgradcheck) or batched gradients (the backward
      // op has no batching rule): the gradients of the step-by-step layer, whose ATen ops have
      // both. First-order training keeps the kernels.
      return step_by_step_gradients(x, weights, h0, c0, lengths,
                                    {given(grads[0], y), given(grads[1], h0), given(grads[2], c0)},
                                    create_graph);
    }
    auto [gx, gw_ih, gw_hh, gbias, gh0, gc0] = backward_op().call(
        given(grads[0], y), given(grads[1], h0), given(grads[2], c0), x, weights, h0, c0,
        lengths.defined() ? Opt(lengths) : std::nullopt, y, s[5], s[6], ctx->needs_input_grad(0));
    // Per direction: views of the stacked gradients. b_ih and b_hh have the same gradient, but
    // each must get its own memory: autograd may keep a returned gradient as the parameter's
    // .grad and accumulate later gradients into it in place.
    const int64_t D = h0.size(0), per = static_cast<int64_t>(weights.size()) / D;
    bool both_biases = false;  // input edge 1 + k is weights[k]
    for (int64_t d = 0; d < D && per == 4; ++d) {
      const int64_t b_ih = 1 + d * per + 2, b_hh = b_ih + 1;
      both_biases = both_biases || (ctx->needs_input_grad(b_ih) && ctx->needs_input_grad(b_hh));
    }
    const at::Tensor gbias_hh = both_biases ? gbias.clone() : gbias;
    variable_list out{gx};
    for (int64_t d = 0; d < D; ++d) {
      out.push_back(gw_ih[d]);
      out.push_back(gw_hh[d]);
      if (per == 4) {
        out.push_back(gbias[d]);
        out.push_back(gbias_hh[d]);
      }
    }
    out.insert(out.end(), {gh0, gc0, at::Tensor(), at::Tensor()});
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_autograd(
    const at::Tensor& x, at::TensorList weights, const at::Tensor& h0, const at::Tensor& c0,
    const Opt& lengths, bool train) {
  if (!records_graph(x, h0, c0, weights)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(x, weights, h0, c0, lengths, train);
  }
  const variable_list r = LstmLayerFunction::apply(x, weights, h0, c0, lengths, train);
  return {r[0], r[1], r[2], r[3], r[4]};
}

// lstm_layer_backward under a graph (create_graph=True): the first-order gradients are computed
// as usual, and differentiating them again is refused with a clear error instead of failing
// inside the kernel's ATen calls.
class LstmLayerBackwardFunction : public torch::autograd::Function<LstmLayerBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_y,
                               const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                               const at::Tensor& x, at::TensorList weights, const at::Tensor& h0,
                               const at::Tensor& c0, const Opt& lengths, const at::Tensor& y,
                               const at::Tensor& gates, const at::Tensor& cell, bool need_grad_x) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gx, gw_ih, gw_hh, gbias, gh0, gc0] = backward_op().call(
        grad_y, grad_h_n, grad_c_n, x, weights, h0, c0, lengths, y, gates, cell, need_grad_x);
    return {gx, gw_ih, gw_hh, gbias, gh0, gc0};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false, "lstm_layer: the gradient of the gradient (double backward, e.g. a gradient "
                       "penalty through FusedLSTM) is not supported; first-order gradients are");
    return {};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_autograd(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                             const at::Tensor& grad_c_n, const at::Tensor& x, at::TensorList weights,
                             const at::Tensor& h0, const at::Tensor& c0, const Opt& lengths,
                             const at::Tensor& y, const at::Tensor& gates, const at::Tensor& cell,
                             bool need_grad_x) {
  if (!records_graph(grad_y, grad_h_n, grad_c_n, x, h0, c0, y, weights)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return backward_op().call(grad_y, grad_h_n, grad_c_n, x, weights, h0, c0, lengths, y, gates,
                              cell, need_grad_x);
  }
  const variable_list r = LstmLayerBackwardFunction::apply(
      grad_y, grad_h_n, grad_c_n, x, weights, h0, c0, lengths, y, gates, cell, need_grad_x);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, Autograd, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_autograd);
  m.impl("lstm_layer_backward", &lstm_layer_backward_autograd);
}

}  // namespace cnnlstm_ext::lstm
