// CPU kernels of lstm_layer_forward / lstm_layer_backward.
//
// Forward: the input projection of every step is one GEMM per direction
//   xproj_d: [T*B, 4H] = x: [T*B, I] . w_ih_d^T: [I, 4H] + bias_d
// then the recurrence over time (lstm_cpu_recurrence.h: per step the recurrent product
// h_{s-1} . w_hh^T, the gate nonlinearities and the cell update). Direction 1 runs in reverse time.
// Backward mirrors it: a reverse-time recurrence produces the pre-activation gate gradients dG,
// then the weight, bias and input gradients are large GEMMs/reductions over all T*B rows.
// Bfloat16/float16 inputs are computed in float32 (the accumulation dtype), except the large
// products of bfloat16 on a CPU with AVX512-BF16 (bf16_products). Each direction's weights are
// read where they lie (FusedLSTM keeps a CPU module's parameters apart, as nn.LSTM does): one
// GEMM per direction, and w_hh packed from each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "kernel_trace.h"
#include "lstm/lstm.h"
#include "lstm/lstm_cpu_cell.h"
#include "lstm/lstm_cpu_recurrence.h"
#include "options.h"

namespace cnnlstm_ext::lstm {
namespace {

// Per-sequence lengths as a host array (all T when absent).
std::vector<int64_t> host_lengths(const std::optional<at::Tensor>& lengths, const LstmDims& d) {
  std::vector<int64_t> L(d.B, d.T);
  if (lengths.has_value()) {
    auto Lc = lengths->contiguous();
    std::copy(Lc.data_ptr<int64_t>(), Lc.data_ptr<int64_t>() + d.B, L.begin());
  }
  return L;
}

// A [T, B, ...] output whose valid steps the recurrence writes: zero-filled only when some steps
// are padding (with lengths), since those are never visited.
at::Tensor padded_output(at::IntArrayRef size, const at::TensorOptions& options,
                         const std::optional<at::Tensor>& lengths) {
  return lengths.has_value() ? at::zeros(size, options) : at::empty(size, options);
}

// The large GEMMs (input projection; input and input-weight gradients): a: [M, K] . b^T, b: [N, K]
// (any strides) -> [M, N] (+ bias [N]), contiguous.
// In float32 through oneDNN's matmul where this torch has it (mkldnn::_linear_pointwise, the op
// of torch's oneDNN build that inductor uses for frozen CPU linear layers): on the x86 CPU
// measured here (AMD EPYC, Zen 4) it runs these shapes 10-30% faster than ATen's mm (MKL's
// sgemm), and nn.LSTM's oneDNN RNN runs its GEMMs at that rate. bfloat16 (the forward's
// projection on AVX512-BF16 CPUs) too: 0-5% faster than ATen's addmm there.
// Otherwise, with cnnlstm_ext.backends.cpu.gemm = "aten", or while torch.backends.mkldnn is
// disabled (as nn.LSTM then leaves oneDNN too), ATen's mm/addmm.
using OneDnnLinear = at::Tensor(const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, c10::string_view,
                                c10::List<std::optional<c10::Scalar>>,
                                std::optional<c10::string_view>);

// This torch's oneDNN linear, looked up once (none when it lacks it or its signature differs).
const std::optional<c10::TypedOperatorHandle<OneDnnLinear>>& onednn_linear() {
  static const auto op = []() -> std::optional<c10::TypedOperatorHandle<OneDnnLinear>> {
    const auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value() || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU))
      return std::nullopt;
    try {
      return handle->typed<OneDnnLinear>();  // checks the schema against OneDnnLinear
    } catch (const c10::Error&) {
      return std::nullopt;
    }
  }();
  return op;
}

at::Tensor mm_bt(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  const CpuGemm gemm = options().cpu_gemm;
  const auto& onednn = onednn_linear();
  TORCH_CHECK(gemm != CpuGemm::kOneDnn || onednn.has_value(),
              "cnnlstm_ext.backends.cpu.gemm is 'onednn', but this torch has no CPU "
              "mkldnn::_linear_pointwise of the expected signature");
  if (gemm != CpuGemm::kAten && onednn.has_value() &&
      (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) &&
      at::globalContext().userEnabledMkldnn()) {
    record_kernel("cpu:gemm:onednn");
    return onednn->call(a, b, bias, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  record_kernel("cpu:gemm:aten");
  return bias.has_value() ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
}

// bfloat16 inputs on a CPU with AVX512-BF16 run the large products with bfloat16 operands and
// float32 sums: the forward's input projection and recurrent product, the backward's GEMMs (of
// dG rounded once to bfloat16), at twice the multiply-adds per instruction of float32, as
// nn.LSTM's oneDNN RNN runs them. Everything else is computed in float32.
bool bf16_products(const at::Tensor& x, int64_t H) {
  static const bool available = [] {
    const auto k = lstm_cell_kernels<float>();
    return k.recurrent_product_bf16 && k.to_bf16 && k.forward_bf16 && k.backward_bf16;
  }();
  return x.scalar_type() == at::kBFloat16 && H % kRecColumns == 0 && available;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cpu(
    const at::Tensor& x_in, at::TensorList weights, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths, bool train) {
  // Autocast must not reach the ATen calls below (an autocast addmm would hand back a bfloat16
  // xproj to a float kernel); the Python wrapper applies autocast's dtype before the op.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const LstmLayerArgs args = lstm_forward_args(x_in, weights, h0, c0, lengths, /*stack=*/false);
  const LstmDims& d = args.d;
  const std::optional<at::Tensor>& bias = args.bias;
  const auto L = host_lengths(lengths, d);
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, G = 4 * H;
  const auto acc = acc_dtype(x_in.scalar_type());
  // With the bfloat16 products, the projection stays in bfloat16 (the GEMM's output) and the
  // cell kernels write y, gates and cell in bfloat16 too: no [T, B, ...] tensor in float32.
  const bool bf16_product = bf16_products(x_in, H);
  const auto gemm_dtype = bf16_product ? at::kBFloat16 : acc;
  const auto opts = x_in.options().dtype(gemm_dtype);
  auto x = x_in.to(gemm_dtype).contiguous().view({T * B, d.I});
  std::vector<at::Tensor> xproj, w_hh_g;  // per direction [T*B, 4H], [4H, H]
  for (int64_t dir = 0; dir < D; ++dir) {
    const auto b_g = bias.has_value() ? std::optional<at::Tensor>((*bias)[dir].to(gemm_dtype))
                                      : std::nullopt;
    xproj.push_back(mm_bt(x, args.w_ih_d[dir].to(gemm_dtype), b_g));
    w_hh_g.push_back(args.w_hh_d[dir].to(gemm_dtype).contiguous());
  }
  auto h = h0.to(acc).contiguous().clone();
  auto c = c0.to(acc).contiguous().clone();
  // The recurrence writes every valid step; padding (steps past a length) must read as zeros.
  auto y = padded_output({T, B, D * H}, opts, lengths);
  at::Tensor gates, cell;
  if (train) {
    gates = padded_output({T, B, D, G}, opts, lengths);
    cell = padded_output({T, B, D, H}, opts, lengths);
  } else {
    gates = at::empty({0}, opts);
    cell = at::empty({0}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "lstm_layer_forward_cpu", [&] {
    forward_recurrence<scalar_t>(d, L, xproj, w_hh_g, bf16_product, h, c, y,
                                 train ? &gates : nullptr, train ? &cell : nullptr);
  });
  const auto dt = x_in.scalar_type();
  // Saved for backward in x's dtype, as on CUDA (see check_lstm_backward_inputs).
  return {y.to(dt), h.to(dt), c.to(dt), gates.to(dt), cell.to(dt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& x_in,
                        at::TensorList weights, const at::Tensor& h0, const at::Tensor& c0,
                        const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                        const at::Tensor& gates, const at::Tensor& cell, bool need_grad_x) {
  // Autocast must not reach the ATen calls below (an autocast addmm would hand back a bfloat16
  // xproj to a float kernel); the Python wrapper applies autocast's dtype before the op.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const LstmLayerArgs args = lstm_backward_args(grad_y, grad_h_n, grad_c_n, x_in, weights, h0, c0,
                                                lengths, y, gates, cell, /*stack=*/false);
  const LstmDims& d = args.d;
  const at::ScalarType wdt = args.weight_dtype;
  const auto L = host_lengths(lengths, d);
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, G = 4 * H;
  const auto acc = acc_dtype(x_in.scalar_type());
  // With the bfloat16 products, the cell kernels read the saved bfloat16 tensors and write dG in
  // bfloat16, the GEMMs' operand: no [T, B, ...] tensor in float32, as in the forward.
  const bool bf16_product = bf16_products(x_in, H);
  const auto gemm_dtype = bf16_product ? at::kBFloat16 : acc;
  std::vector<at::Tensor> w_hh_a;  // per direction [4H, H]
  for (const auto& w : args.w_hh_d) w_hh_a.push_back(w.to(acc).contiguous());
  auto gy = grad_y.to(gemm_dtype).contiguous();
  auto dh = grad_h_n.to(acc).contiguous().clone();
  auto dc = grad_c_n.to(acc).contiguous().clone();
  auto dG = padded_output({T, B, D, G}, gy.options(), lengths);
  auto gates_c = gates.to(gemm_dtype).contiguous();
  auto cell_c = cell.to(gemm_dtype).contiguous();
  auto c0_c = c0.to(gemm_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "lstm_layer_backward_cpu", [&] {
    backward_recurrence<scalar_t>(d, L, bf16_product, gy, gates_c, cell_c, c0_c, w_hh_a, dh, dc,
                                  dG);
  });
  auto dG2 = dG.view({T * B, D * G});
  auto x = x_in.to(gemm_dtype).contiguous().view({T * B, d.I});
  auto grad_w_hh = recurrent_weight_grad(
      dG, y.to(gemm_dtype).contiguous(), h0.to(gemm_dtype).contiguous(),
      lengths.has_value() ? lengths->contiguous() : at::Tensor(),
      [](at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
        accumulate ? out.addmm_(a, b) : at::mm_out(out, a, b);
      });
  // [D, 4H, I]. at::mm takes dG2^T as a transposed operand, where oneDNN's linear (mm_bt) copies
  // it first: at::mm ran these shapes here 1.1-1.5x faster in bfloat16, and in float32 up to
  // 1.18x faster from T*B = 1024 rows (0.93x to 1.06x at 256).
  auto grad_w_ih = at::mm(dG2.t(), x).view({D, G, d.I});
  auto grad_bias = dG2.sum(0, /*keepdim=*/false, acc).view({D, G});  // [D, 4H], summed in acc
  const auto dt = x_in.scalar_type();
  at::Tensor grad_x;  // [T, B, I] = sum over directions of dG_d . w_ih_d
  if (need_grad_x) {
    if (D == 1) {
      grad_x = mm_bt(dG2, args.w_ih_d[0].to(gemm_dtype).t(), std::nullopt);
    } else {  // (ATen's mm reads each direction's columns of dG2 in place; oneDNN would copy)
      grad_x = at::mm(dG2.narrow(1, 0, G), args.w_ih_d[0].to(gemm_dtype));
      for (int64_t dir = 1; dir < D; ++dir)
        grad_x.addmm_(dG2.narrow(1, dir * G, G), args.w_ih_d[dir].to(gemm_dtype));
    }
    grad_x = grad_x.view({T, B, d.I}).to(dt);
  }
  // Weight gradients in the dtype the weights came in (float32 master weights under autocast).
  return {grad_x, grad_w_ih.to(wdt), grad_w_hh.to(wdt), grad_bias.to(wdt), dh.to(dt), dc.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace cnnlstm_ext::lstm
