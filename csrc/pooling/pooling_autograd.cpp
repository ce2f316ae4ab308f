// Autograd of the pooling ops, for every device: each forward op is wrapped in a
// torch::autograd::Function whose backward calls the matching backward op, and each backward op
// (linear in grad_out) in one whose backward applies the forward's reduction to the incoming
// gradient, so that gradients of gradients (create_graph=True) are right; the attention mode's
// backward, not linear in x and the score parameters, refuses a second derivative. Registered
// here in C++ rather than with torch.library.register_autograd because the Python autograd layer
// costs about 4 µs per call without a graph and 15 µs with one (benchmarks/RESULTS.md,
// "Pooling"), as much as the kernel of a 256-frame CUDA forward: host time bounds these small ops.
// Fake (meta) kernels of all four ops stay in cnnlstm_ext/ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "autograd_graph.h"
#include "pooling/pooling.h"

namespace cnnlstm_ext::pooling {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Typed handles of the ops, looked up once.
const auto& frame_pool_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cnnlstm_ext::frame_pool_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view,
                                                                       bool, std::optional<at::ScalarType>)>();
  return op;
}

const auto& temporal_pool_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cnnlstm_ext::temporal_pool_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, bool,
                                 bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op;
}

const auto& frame_pool_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cnnlstm_ext::frame_pool_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                                               at::ScalarType, bool, int64_t, c10::string_view, bool)>();
  return op;
}

const auto& temporal_pool_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cnnlstm_ext::temporal_pool_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, c10::string_view, bool, bool,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op;
}

class FramePoolFunction : public torch::autograd::Function<FramePoolFunction> {
 public:
  // x: [N, C, h, w] -> out: [T, B, C] ([B, T, C] when batch_first), argmax: [N, C] int32 or [0].
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t batch_size,
                               const std::string& mode, bool batch_first,
                               std::optional<at::ScalarType> out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, argmax] = frame_pool_forward_op().call(x, batch_size, mode, batch_first, out_dtype);
    ctx->save_for_backward({argmax});
    ctx->mark_non_differentiable({argmax});
    ctx->saved_data["x_size"] = x.sym_sizes();
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["channels_last"] = pooling::frame_pool_reads_channels_last(x);
    ctx->saved_data["batch_size"] = batch_size;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["batch_first"] = batch_first;
    return {out, argmax};
  }

  // grads: {grad_out, grad_argmax (unused)} -> one gradient per forward argument.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& d = ctx->saved_data;
    const std::vector<c10::SymInt> x_size = d.at("x_size").toSymIntVector();
    at::Tensor grad_x = frame_pool_backward_op().call(
        grads[0], ctx->get_saved_variables()[0], x_size, d.at("x_dtype").toScalarType(),
        d.at("channels_last").toBool(), d.at("batch_size").toInt(), d.at("mode").toStringRef(),
        d.at("batch_first").toBool());
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class TemporalPoolFunction : public torch::autograd::Function<TemporalPoolFunction> {
 public:
  // x: [T, B, D] ([B, T, D] when batch_first) -> out: [B, D], aux (arg-max, attention weights or
  // empty).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& lengths, const std::string& mode,
                               bool batch_first, bool bidirectional,
                               const std::optional<at::Tensor>& score_weight,
                               const std::optional<at::Tensor>& score_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, aux] = temporal_pool_forward_op().call(x, lengths, mode, batch_first, bidirectional,
                                                      score_weight, score_bias);
    // Undefined tensors stand for None; optional_of restores them in the backward.
    const at::Tensor none;
    ctx->save_for_backward({x, lengths.value_or(none), aux, score_weight.value_or(none),
                            score_bias.value_or(none)});
    ctx->mark_non_differentiable({aux});
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["batch_first"] = batch_first;
    ctx->saved_data["bidirectional"] = bidirectional;
    return {out, aux};
  }

  // grads: {grad_out, grad_aux (unused)} -> one gradient per forward argument.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &lengths = saved[1], &aux = saved[2];
    const at::Tensor &score_weight = saved[3], &score_bias = saved[4];
    const auto& d = ctx->saved_data;
    const std::string& mode = d.at("mode").toStringRef();
    auto [grad_x, grad_w, grad_b] = temporal_pool_backward_op().call(
        grads[0], x, optional_of(lengths), aux, mode, d.at("batch_first").toBool(),
        d.at("bidirectional").toBool(), optional_of(score_weight), optional_of(score_bias));
    // The backward op returns empty tensors for gradients that do not exist.
    if (mode != "attention") grad_w = grad_b = at::Tensor();
    else if (!score_bias.defined()) grad_b = at::Tensor();
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_w, grad_b};
  }
};

// frame_pool_backward as a function of grad_out: grad_x = J^T grad_out with J the forward's
// Jacobian, so the gradient of grad_x . gg with respect to grad_out is J gg: the forward's reduction
// of gg, in grad_out's layout and dtype. Nothing flows to argmax.
class FramePoolBackwardFunction : public torch::autograd::Function<FramePoolBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& argmax,
                               const std::vector<c10::SymInt>& x_size, at::ScalarType x_dtype,
                               bool channels_last, int64_t batch_size, const std::string& mode,
                               bool batch_first) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor grad_x = frame_pool_backward_op().call(grad_out, argmax, x_size, x_dtype, channels_last,
                                                      batch_size, mode, batch_first);
    ctx->save_for_backward({argmax});
    ctx->saved_data["grad_out_dtype"] = grad_out.scalar_type();
    ctx->saved_data["batch_size"] = batch_size;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["batch_first"] = batch_first;
    return {grad_x};
  }

  // grads: {gg}, gg: [N, C, h, w] -> gradient of grad_out: [T, B, C] ([B, T, C] when batch_first).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& d = ctx->saved_data;
    const at::Tensor& gg = grads[0];
    const int64_t B = d.at("batch_size").toInt();
    const bool batch_first = d.at("batch_first").toBool();
    const auto dtype = d.at("grad_out_dtype").toScalarType();
    at::Tensor g;
    if (d.at("mode").toStringRef() == "avg") {
      g = std::get<0>(frame_pool_forward_op().call(gg, B, "avg", batch_first, dtype));
    } else {  // the value of gg at each plane's arg-max: [N, C] in frame order (n = b*T + t)
      const at::Tensor argmax = ctx->get_saved_variables()[0].to(at::kLong).unsqueeze(2);  // [N, C, 1]
      const at::Tensor picked = gg.flatten(2).gather(2, argmax).squeeze(2);
      const at::Tensor btc = picked.view({B, picked.size(0) / B, picked.size(1)});
      g = (batch_first ? btc : btc.transpose(0, 1)).to(dtype).contiguous();
    }
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// temporal_pool_backward as a function of grad_out. For "mean", "max" and "last" grad_x is linear in
// grad_out alone (J^T grad_out), so the gradient of grad_x . gg with respect to grad_out is J gg:
// the forward's reduction of gg; nothing flows to x. "attention" refuses: its backward depends on
// x and the score parameters too.
class TemporalPoolBackwardFunction : public torch::autograd::Function<TemporalPoolBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& x,
                               const std::optional<at::Tensor>& lengths, const at::Tensor& aux,
                               const std::string& mode, bool batch_first, bool bidirectional,
                               const std::optional<at::Tensor>& score_weight,
                               const std::optional<at::Tensor>& score_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_w, grad_b] = temporal_pool_backward_op().call(
        grad_out, x, lengths, aux, mode, batch_first, bidirectional, score_weight, score_bias);
    ctx->save_for_backward({lengths.value_or(at::Tensor()), aux});
    if (mode != "attention") ctx->mark_non_differentiable({grad_w, grad_b});  // empty
    ctx->saved_data["grad_out_dtype"] = grad_out.scalar_type();
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["batch_first"] = batch_first;
    ctx->saved_data["bidirectional"] = bidirectional;
    return {grad_x, grad_w, grad_b};
  }

  // grads: {gg [like x], gradients of grad_w and grad_b} -> gradient of grad_out: [B, D].
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& d = ctx->saved_data;
    const std::string& mode = d.at("mode").toStringRef();
    TORCH_CHECK(mode != "attention",
                "temporal_pool: the gradient of the gradient (double backward) is not supported for mode "
                "\"attention\"; it is for \"mean\", \"max\" and \"last\"");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& gg = grads[0];
    const bool batch_first = d.at("batch_first").toBool();
    at::Tensor g;
    if (mode == "max") {  // the value of gg at each (b, d)'s arg-max step: aux [B, D] int32
      const int64_t tdim = batch_first ? 1 : 0;
      g = gg.gather(tdim, saved[1].to(at::kLong).unsqueeze(tdim)).squeeze(tdim);
    } else {
      g = std::get<0>(temporal_pool_forward_op().call(gg, optional_of(saved[0]), mode, batch_first,
                                                       d.at("bidirectional").toBool(), std::nullopt,
                                                       std::nullopt));
    }
    g = g.to(d.at("grad_out_dtype").toScalarType());
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> frame_pool_forward_autograd(const at::Tensor& x, int64_t batch_size,
                                                               c10::string_view mode, bool batch_first,
                                                               std::optional<at::ScalarType> out_dtype) {
  if (!records_graph(x)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return frame_pool_forward_op().call(x, batch_size, mode, batch_first, out_dtype);
  }
  const variable_list r = FramePoolFunction::apply(x, batch_size, std::string(mode), batch_first, out_dtype);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor> temporal_pool_forward_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& lengths, c10::string_view mode, bool batch_first,
    bool bidirectional, const std::optional<at::Tensor>& score_weight,
    const std::optional<at::Tensor>& score_bias) {
  if (!records_graph(x, score_weight, score_bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return temporal_pool_forward_op().call(x, lengths, mode, batch_first, bidirectional, score_weight,
                                           score_bias);
  }
  const variable_list r = TemporalPoolFunction::apply(x, lengths, std::string(mode), batch_first,
                                                      bidirectional, score_weight, score_bias);
  return {r[0], r[1]};
}

at::Tensor frame_pool_backward_autograd(const at::Tensor& grad_out, const at::Tensor& argmax,
                                        c10::SymIntArrayRef x_size, at::ScalarType x_dtype, bool channels_last,
                                        int64_t batch_size, c10::string_view mode, bool batch_first) {
  if (!records_graph(grad_out)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return frame_pool_backward_op().call(grad_out, argmax, x_size, x_dtype, channels_last, batch_size, mode,
                                         batch_first);
  }
  return FramePoolBackwardFunction::apply(grad_out, argmax, x_size.vec(), x_dtype, channels_last, batch_size,
                                          std::string(mode), batch_first)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_pool_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& lengths,
    const at::Tensor& aux, c10::string_view mode, bool batch_first, bool bidirectional,
    const std::optional<at::Tensor>& score_weight, const std::optional<at::Tensor>& score_bias) {
  // A graph when anything the result depends on needs a gradient: grad_out, and for "attention"
  // x and the score parameters (whose second derivatives the node then refuses).
  if (!records_graph(grad_out) && !(mode == "attention" && records_graph(x, score_weight, score_bias))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return temporal_pool_backward_op().call(grad_out, x, lengths, aux, mode, batch_first, bidirectional,
                                            score_weight, score_bias);
  }
  const variable_list r = TemporalPoolBackwardFunction::apply(grad_out, x, lengths, aux, std::string(mode),
                                                              batch_first, bidirectional, score_weight,
                                                              score_bias);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, Autograd, m) {
  m.impl("frame_pool_forward", &frame_pool_forward_autograd);
  m.impl("temporal_pool_forward", &temporal_pool_forward_autograd);
  m.impl("frame_pool_backward", &frame_pool_backward_autograd);
  m.impl("temporal_pool_backward", &temporal_pool_backward_autograd);
}

}  // namespace cnnlstm_ext::pooling
