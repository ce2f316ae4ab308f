// CUDA kernels of lstm_layer_forward / lstm_layer_backward.
//
// Forward, for one layer and both directions at once:
//   1. xproj: [T*B, D*4H] = x . w_ih^T, one cuBLAS GEMM for every step and direction (the bias
//      is added where the recurrence reads xproj: no broadcast copy of it, no extra kernel).
//   2. The recurrence, on one of two paths:
//      - persistent (default where it fits): one cooperative kernel for the whole sequence. The
//        CTAs split the hidden units of both directions (HB units, i.e. 4*HB rows of w_hh, each);
//        a CTA keeps its rows of w_hh in shared memory for all T steps, multiplies h_{s-1} by
//        them, applies the gates and the cell update in registers, publishes its slice of h_s and
//        meets the other CTAs of its direction at a flag barrier before the next step.
//      - stepwise (any shape, float64, or when the grid cannot be co-resident): per step one
//        batched cuBLAS GEMM for both directions and one fused pointwise kernel.
// Backward mirrors it: a reverse-time recurrence (persistent or stepwise) produces the
// pre-activation gate gradients dG: [T, B, D, 4H]; then grad_w_ih, grad_w_hh and grad_x are
// three large GEMMs over all T*B rows and grad_bias one reduction. Nothing uses atomics on
// values, so results are bitwise reproducible.
// Lengths: sequence b covers steps s < lengths[b], at time t = s (direction 0) or
// t = lengths[b] - 1 - s (direction 1); padded positions get zero outputs and no compute.
// Precision: float32 accumulation and cell state for float32/bfloat16/float16; float64 runs the
// stepwise path in float64. What is saved for backward (gates, cell) and the gate gradients fed
// to the weight GEMMs are stored in the input dtype. The persistent recurrence multiplies in
// exact float32 FMA. float32 GEMMs use TF32 tensor cores where nn.LSTM would (see matmul_into).#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "kernel_trace.h"
#include "lstm/lstm.h"
#include "lstm/lstm_cuda_gemm.cuh"
#include "lstm/lstm_cuda_persistent_backward.cuh"
#include "lstm/lstm_cuda_persistent_forward.cuh"
#include "lstm/lstm_cuda_plan.cuh"
#include "lstm/lstm_cuda_stepwise.cuh"
#include "options.h"

namespace cnnlstm_ext::lstm {
namespace {

template <typename scalar_t>
bool forward_persistent(const LstmDims& d, const at::Tensor& xproj, const scalar_t* bias,
                        const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
                        const int64_t* lengths,
                        at::Tensor& y, at::Tensor& h_n, at::Tensor& c_n, at::Tensor* gates,
                        at::Tensor* cell) {
  // The instantiation for the tensor-core product, or the FMA product with batch tile BT.
  auto kernel_for = [](int BT, bool mma) {
    if constexpr (sizeof(scalar_t) == 2) {
      if (mma) return lstm_forward_persistent_kernel<scalar_t, 8, true>;
    }
    return BT == 1 ? lstm_forward_persistent_kernel<scalar_t, 1, false>
                   : lstm_forward_persistent_kernel<scalar_t, 4, false>;
  };
  const auto plan = plan_persistent<scalar_t>(d, /*forward=*/true, kernel_for);
  if (!persistent_plan_usable(plan, "lstm_layer_forward")) return false;
  const bool tagged = options().lstm_exchange == LstmExchange::kTagged;
  TORCH_CHECK(!tagged || !plan.mma, "cnnlstm_ext.backends.lstm.exchange 'tagged' needs the FMA "
              "product of the persistent kernel; set cnnlstm_ext.backends.lstm.mma to False");
  // hbuf (or hwords): [2, D, B, H]. The kernel reads h0 in float32: h0 itself, or converted into
  // the scratch (slot 0 of hbuf, which the recurrence first writes at step 1, after every CTA has
  // read step 0's input).
  const int64_t state = d.D * d.B * d.H;
  const auto buf = exchange_buffers(state, d.D, xproj, tagged);
  const float* h0f = nullptr;
  if (h0.scalar_type() == at::kFloat) {
    h0f = h0.data_ptr<float>();
  } else {
    at::from_blob(buf.scratch, h0.sizes(), xproj.options().dtype(at::kFloat)).copy_(h0);
    h0f = buf.scratch;
  }
  PersistentForwardParams<scalar_t> p;
  p.xproj = xproj.data_ptr<scalar_t>();
  p.bias = bias;
  p.w_hh = w_hh.data_ptr<scalar_t>();
  p.h0 = h0f;
  p.c0 = c0.data_ptr<scalar_t>();
  p.lengths = lengths;
  p.hbuf = buf.data;
  p.hwords = buf.words;
  p.y = y.data_ptr<scalar_t>();
  p.h_n = h_n.data_ptr<scalar_t>();
  p.c_n = c_n.data_ptr<scalar_t>();
  p.gates = gates ? gates->data_ptr<scalar_t>() : nullptr;
  p.cell = cell ? cell->data_ptr<scalar_t>() : nullptr;
  p.barrier = buf.barrier;
  static_cast<PersistentGeometry&>(p) = plan.geometry(d);
  launch_cooperative(reinterpret_cast<const void*>(kernel_for(plan.BT, plan.mma)), d.D * plan.nblk, plan.smem, &p);
  record_kernel("cuda:lstm_forward:persistent:", plan.mma ? "mma" : "fma",
                tagged ? ":tagged" : ":barrier");
  return true;
}

template <typename scalar_t>
bool backward_persistent(const LstmDims& d, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                         const at::Tensor& grad_c_n, const at::Tensor& gates,
                         const at::Tensor& cell, const at::Tensor& c0, const at::Tensor& w_hh,
                         const int64_t* lengths, at::Tensor& dG, at::Tensor& grad_h0,
                         at::Tensor& grad_c0) {
  // The instantiation for the tensor-core product, or the FMA product with batch tile BT.
  auto kernel_for = [](int BT, bool mma) {
    if constexpr (sizeof(scalar_t) == 2) {
      if (mma) return lstm_backward_persistent_kernel<scalar_t, 8, true>;
    }
    return BT == 1 ? lstm_backward_persistent_kernel<scalar_t, 1, false>
                   : lstm_backward_persistent_kernel<scalar_t, 4, false>;
  };
  const auto plan = plan_persistent<scalar_t>(d, /*forward=*/false, kernel_for);
  if (!persistent_plan_usable(plan, "lstm_layer_backward")) return false;
  const auto buf = exchange_buffers(d.D * d.B * 4 * d.H, d.D, gates);  // dgbuf: [2, D, B, 4H]
  PersistentBackwardParams<scalar_t> p;
  p.grad_y = grad_y.data_ptr<scalar_t>();
  p.grad_h_n = grad_h_n.data_ptr<scalar_t>();
  p.grad_c_n = grad_c_n.data_ptr<scalar_t>();
  p.gates = gates.data_ptr<scalar_t>();
  p.cell = cell.data_ptr<scalar_t>();
  p.c0 = c0.data_ptr<scalar_t>();
  p.w_hh = w_hh.data_ptr<scalar_t>();
  p.lengths = lengths;
  p.dgbuf = buf.data;
  p.dG = dG.data_ptr<scalar_t>();
  p.grad_h0 = grad_h0.data_ptr<scalar_t>();
  p.grad_c0 = grad_c0.data_ptr<scalar_t>();
  p.barrier = buf.barrier;
  static_cast<PersistentGeometry&>(p) = plan.geometry(d);
  launch_cooperative(reinterpret_cast<const void*>(kernel_for(plan.BT, plan.mma)), d.D * plan.nblk, plan.smem, &p);
  record_kernel("cuda:lstm_backward:persistent:", plan.mma ? "mma" : "fma", ":barrier");
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cuda(
    const at::Tensor& x_in, at::TensorList weights, const at::Tensor& h0_in,
    const at::Tensor& c0_in, const std::optional<at::Tensor>& lengths, bool train) {
  // Autocast must not reach the ATen calls below (they must run in the dtypes chosen here);
  // the Python wrapper applies autocast's dtype before the op.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const LstmLayerArgs args =
      lstm_forward_args(x_in, weights, h0_in, c0_in, lengths, /*stack=*/true);
  const LstmDims& d = args.d;
  const std::optional<at::Tensor>& bias = args.bias;
  TORCH_CHECK(x_in.is_cuda(), "lstm_layer_forward: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, G = 4 * H;
  const auto dt = x_in.scalar_type();
  auto x = x_in.contiguous();
  auto w_ih = args.w_ih.contiguous();
  auto w_hh = args.w_hh.contiguous();
  auto h0 = h0_in.contiguous();
  auto c0 = c0_in.contiguous();
  // xproj: [T*B, D*4H], every step and both directions in one GEMM; the bias [D, 4H] is added
  // by the recurrence.
  at::Tensor xproj = project(x.view({T * B, d.I}), w_ih.view({D * G, d.I}));
  const auto bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto y = at::empty({T, B, D * H}, x.options());
  auto h_n = at::empty({D, B, H}, x.options());
  auto c_n = at::empty({D, B, H}, x.options());
  // Saved for backward in x's dtype (check_lstm_backward_inputs says why).
  at::Tensor gates = at::empty({train ? T : 0, B, D, G}, x.options());
  at::Tensor cell = at::empty({train ? T : 0, B, D, H}, x.options());
  if (!train) {
    gates = gates.view({0});
    cell = cell.view({0});
  }
  const auto lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const int64_t* L = lengths_c.defined() ? lengths_c.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "lstm_layer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bias_p = bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr;
    bool done = false;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (use_persistent(d, dt)) {
        done = forward_persistent<scalar_t>(d, xproj, bias_p, w_hh, h0, c0, L, y, h_n, c_n,
                                            train ? &gates : nullptr, train ? &cell : nullptr);
      }
    }
    if (!done) {
      forward_stepwise<scalar_t, acc_t>(d, xproj, bias_p, w_hh, h0, c0, L, y, h_n, c_n,
                                        train ? &gates : nullptr, train ? &cell : nullptr);
    }
  });
  return {y, h_n, c_n, gates, cell};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& grad_h_n_in,
                         const at::Tensor& grad_c_n_in, const at::Tensor& x_in,
                         at::TensorList weights, const at::Tensor& h0_in, const at::Tensor& c0_in,
                         const std::optional<at::Tensor>& lengths, const at::Tensor& y_in,
                         const at::Tensor& gates_in, const at::Tensor& cell_in, bool need_grad_x) {
  // Autocast must not reach the ATen calls below (they must run in the dtypes chosen here);
  // the Python wrapper applies autocast's dtype before the op.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const LstmLayerArgs args = lstm_backward_args(grad_y_in, grad_h_n_in, grad_c_n_in, x_in, weights,
                                                h0_in, c0_in, lengths, y_in, gates_in, cell_in,
                                                /*stack=*/true);
  const LstmDims& d = args.d;
  const at::ScalarType wdt = args.weight_dtype;
  TORCH_CHECK(x_in.is_cuda(), "lstm_layer_backward: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, G = 4 * H;
  const auto dt = x_in.scalar_type();
  auto grad_y = grad_y_in.contiguous();
  auto grad_h_n = grad_h_n_in.contiguous();
  auto grad_c_n = grad_c_n_in.contiguous();
  auto x = x_in.contiguous();
  auto w_ih = args.w_ih.contiguous();
  auto w_hh = args.w_hh.contiguous();
  auto h0 = h0_in.contiguous();
  auto c0 = c0_in.contiguous();
  auto y = y_in.contiguous();
  auto gates = gates_in.contiguous();
  auto cell = cell_in.contiguous();
  // Pre-activation gate gradients in x's dtype, the dtype of the GEMMs below; every element is
  // written by the recurrence (which exchanges them between steps in float32).
  auto dG = at::empty({T, B, D, G}, x.options());
  auto grad_h0 = at::empty({D, B, H}, x.options());
  auto grad_c0 = at::empty({D, B, H}, x.options());
  const auto lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const int64_t* L = lengths_c.defined() ? lengths_c.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "lstm_layer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bool done = false;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (use_persistent(d, dt)) {
        done = backward_persistent<scalar_t>(d, grad_y, grad_h_n, grad_c_n, gates, cell, c0, w_hh,
                                             L, dG, grad_h0, grad_c0);
      }
    }
    if (!done) {
      backward_stepwise<scalar_t, acc_t>(d, grad_y, grad_h_n, grad_c_n, gates, cell, c0, w_hh, L,
                                         dG, grad_h0, grad_c0);
    }
  });
  // Weight and input gradients: large GEMMs over all T*B rows, in the input dtype (tensor cores
  // for bfloat16/float16; TF32 for float32 where nn.LSTM would use it).
  auto dG_mm = dG.view({T * B, D * G});
  auto grad_w_ih = at::empty({D, G, d.I}, x.options());
  auto grad_w_ih_2d = grad_w_ih.view({D * G, d.I});
  matmul_into(grad_w_ih_2d, dG_mm.t(), x.view({T * B, d.I}));
  auto grad_w_hh = recurrent_weight_grad(
      dG, y, h0, lengths_c, [](at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool acc) {
        matmul_into(out, a, b, acc);
      });
  // ATen's reduction accumulates 16-bit dG in float32 (and writes the weights' dtype).
  auto grad_bias = at::sum(dG, at::IntArrayRef{0, 1}, /*keepdim=*/false, wdt);
  at::Tensor grad_x;  // undefined unless needed
  if (need_grad_x) {
    grad_x = at::empty({T, B, d.I}, x.options());
    auto grad_x_2d = grad_x.view({T * B, d.I});
    matmul_into(grad_x_2d, dG_mm, w_ih.view({D * G, d.I}));
  }
  // Weight gradients in the dtype the weights came in (float32 master weights under autocast).
  return {grad_x, grad_w_ih.to(wdt), grad_w_hh.to(wdt), grad_bias, grad_h0, grad_c0};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
}

}  // namespace cnnlstm_ext::lstm
