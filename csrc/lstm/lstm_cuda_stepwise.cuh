// The per-step path: its pointwise kernels and their host loops.
// Part of the LSTM op's CUDA code, included by lstm_cuda.cu only (one translation unit):
// its definitions live in an anonymous namespace.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include "kernel_trace.h"
#include "lstm/lstm.h"
#include "lstm/lstm_cuda_gemm.cuh"

namespace cnnlstm_ext::lstm {
namespace {

// ---------------------------------------------------------------------------------------------
// Stepwise path: per step, rec = h_{s-1} . w_hh^T (batched cuBLAS GEMM, both directions), then one
// pointwise kernel over D * B * H elements.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void lstm_forward_step_kernel(
    int s, int T, int B, int H, int D,
    const scalar_t* __restrict__ xproj,  // [T, B, D, 4H] without the bias
    const scalar_t* __restrict__ bias,   // [D, 4H] or null
    const scalar_t* __restrict__ rec,    // [D, B, 4H]
    const int64_t* __restrict__ lengths, // [B] or null
    scalar_t* __restrict__ h,            // [D, B, H] h_{s-1} in, h_s out (GEMM operand)
    acc_t* __restrict__ c,               // [D, B, H]
    scalar_t* __restrict__ y,            // [T, B, D*H]
    scalar_t* __restrict__ gates,        // [T, B, D, 4H] or null
    scalar_t* __restrict__ cell) {       // [T, B, D, H] or null
  const int64_t n = static_cast<int64_t>(D) * B * H;
  const int G = 4 * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = idx % H, b = (idx / H) % B, dir = idx / (static_cast<int64_t>(H) * B);
    const int len = seq_length(lengths, b, T);
    if (s >= len) {
      const size_t row = (static_cast<size_t>(s) * B + b) * D + dir;
      y[(static_cast<size_t>(s) * B + b) * D * H + dir * H + j] = scalar_t(0);
      if (gates != nullptr) {
        scalar_t* gr = gates + row * G;
        gr[j] = gr[H + j] = gr[2 * H + j] = gr[3 * H + j] = scalar_t(0);
        cell[row * H + j] = scalar_t(0);
      }
      continue;
    }
    const int t = time_index(dir, s, len);
    const size_t row = (static_cast<size_t>(t) * B + b) * D + dir;
    const scalar_t* xr = xproj + row * G;
    const scalar_t* rr = rec + (static_cast<size_t>(dir) * B + b) * G;
    acc_t pre[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      pre[g] = acc_t(xr[g * H + j]) + acc_t(rr[g * H + j]);
      if (bias != nullptr) pre[g] += acc_t(bias[static_cast<size_t>(dir) * G + g * H + j]);
    }
    const acc_t gi = sigmoid_<acc_t>(pre[0]);
    const acc_t gf = sigmoid_<acc_t>(pre[1]);
    const acc_t gg = tanh_<acc_t>(pre[2]);
    const acc_t go = sigmoid_<acc_t>(pre[3]);
    const acc_t cn = gf * c[idx] + gi * gg;
    const acc_t hn = go * tanh_<acc_t>(cn);
    c[idx] = cn;
    h[idx] = static_cast<scalar_t>(hn);
    y[(static_cast<size_t>(t) * B + b) * D * H + dir * H + j] = static_cast<scalar_t>(hn);
    if (gates != nullptr) {
      scalar_t* gr = gates + row * G;
      gr[j] = static_cast<scalar_t>(gi);
      gr[H + j] = static_cast<scalar_t>(gf);
      gr[2 * H + j] = static_cast<scalar_t>(gg);
      gr[3 * H + j] = static_cast<scalar_t>(go);
      cell[row * H + j] = static_cast<scalar_t>(cn);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void lstm_backward_step_kernel(
    int s, int T, int B, int H, int D,
    const scalar_t* __restrict__ grad_y,    // [T, B, D*H]
    const scalar_t* __restrict__ grad_h_n,  // [D, B, H]
    const scalar_t* __restrict__ dh_rec,    // [D, B, H] dG_{s+1} . w_hh
    acc_t* __restrict__ dc,                 // [D, B, H] grad_c_n in, carried back
    const scalar_t* __restrict__ gates,     // [T, B, D, 4H]
    const scalar_t* __restrict__ cell,      // [T, B, D, H]
    const scalar_t* __restrict__ c0,        // [D, B, H]
    const int64_t* __restrict__ lengths,    // [B] or null
    scalar_t* __restrict__ dG_step,         // [D, B, 4H] GEMM operand for the next step
    scalar_t* __restrict__ dG) {            // [T, B, D, 4H]
  const int64_t n = static_cast<int64_t>(D) * B * H;
  const int G = 4 * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = idx % H, b = (idx / H) % B, dir = idx / (static_cast<int64_t>(H) * B);
    const int len = seq_length(lengths, b, T);
    scalar_t* ds = dG_step + (static_cast<size_t>(dir) * B + b) * G;
    if (s >= len) {
      scalar_t* dr = dG + ((static_cast<size_t>(s) * B + b) * D + dir) * G;
      dr[j] = dr[H + j] = dr[2 * H + j] = dr[3 * H + j] = scalar_t(0);
      ds[j] = ds[H + j] = ds[2 * H + j] = ds[3 * H + j] = scalar_t(0);
      continue;
    }
    const int t = time_index(dir, s, len);
    const size_t row = (static_cast<size_t>(t) * B + b) * D + dir;
    const acc_t dh_in = (s + 1 < len) ? acc_t(dh_rec[idx]) : acc_t(grad_h_n[idx]);
    const acc_t dh = acc_t(grad_y[(static_cast<size_t>(t) * B + b) * D * H + dir * H + j]) + dh_in;
    const scalar_t* gr = gates + row * G;
    const acc_t gi = acc_t(gr[j]), gf = acc_t(gr[H + j]), gg = acc_t(gr[2 * H + j]),
                go = acc_t(gr[3 * H + j]);
    const acc_t tc = tanh_<acc_t>(acc_t(cell[row * H + j]));
    const acc_t c_prev = acc_t(
        s == 0 ? c0[idx]
               : cell[((static_cast<size_t>(time_index(dir, s - 1, len)) * B + b) * D + dir) * H + j]);
    const acc_t one(1);
    const acc_t dcv = dc[idx] + dh * go * (one - tc * tc);
    const acc_t di = dcv * gg * gi * (one - gi);
    const acc_t df = dcv * c_prev * gf * (one - gf);
    const acc_t dg = dcv * gi * (one - gg * gg);
    const acc_t d_o = dh * tc * go * (one - go);
    dc[idx] = dcv * gf;
    scalar_t* dr = dG + row * G;
    dr[j] = ds[j] = static_cast<scalar_t>(di);
    dr[H + j] = ds[H + j] = static_cast<scalar_t>(df);
    dr[2 * H + j] = ds[2 * H + j] = static_cast<scalar_t>(dg);
    dr[3 * H + j] = ds[3 * H + j] = static_cast<scalar_t>(d_o);
  }
}


template <typename scalar_t, typename acc_t>
void forward_stepwise(const LstmDims& d, const at::Tensor& xproj, const scalar_t* bias,
                      const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
                      const int64_t* lengths,
                      at::Tensor& y, at::Tensor& h_n, at::Tensor& c_n, at::Tensor* gates,
                      at::Tensor* cell) {
  record_kernel("cuda:lstm_forward:stepwise");
  auto stream = at::cuda::getCurrentCUDAStream();
  auto h = h0.clone();                                        // [D, B, H] GEMM operand
  at::Tensor c = c0.to(c10::CppTypeToScalarType<acc_t>::value);  // [D, B, H]
  if (c.data_ptr() == c0.data_ptr()) c = c.clone();
  auto rec = at::empty({d.D, d.B, 4 * d.H}, xproj.options());
  auto w_hh_t = w_hh.transpose(1, 2);                        // [D, H, 4H]
  const int grid = grid_for(d.D * d.B * d.H);
  for (int64_t s = 0; s < d.T; ++s) {
    matmul_into(rec, h, w_hh_t);
    lstm_forward_step_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        static_cast<int>(s), d.T, d.B, d.H, d.D, xproj.data_ptr<scalar_t>(), bias,
        rec.data_ptr<scalar_t>(), lengths, h.data_ptr<scalar_t>(), c.data_ptr<acc_t>(),
        y.data_ptr<scalar_t>(), gates ? gates->data_ptr<scalar_t>() : nullptr,
        cell ? cell->data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  h_n.copy_(h);
  c_n.copy_(c);
}

template <typename scalar_t, typename acc_t>
void backward_stepwise(const LstmDims& d, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                       const at::Tensor& grad_c_n, const at::Tensor& gates,
                       const at::Tensor& cell, const at::Tensor& c0, const at::Tensor& w_hh,
                       const int64_t* lengths, at::Tensor& dG, at::Tensor& grad_h0,
                       at::Tensor& grad_c0) {
  record_kernel("cuda:lstm_backward:stepwise");
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dc = grad_c_n.to(c10::CppTypeToScalarType<acc_t>::value);
  if (dc.data_ptr() == grad_c_n.data_ptr()) dc = dc.clone();
  auto dG_step = at::empty({d.D, d.B, 4 * d.H}, grad_y.options());
  auto dh_rec = at::zeros({d.D, d.B, d.H}, grad_y.options());
  const int grid = grid_for(d.D * d.B * d.H);
  for (int64_t s = d.T - 1; s >= 0; --s) {
    lstm_backward_step_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        static_cast<int>(s), d.T, d.B, d.H, d.D, grad_y.data_ptr<scalar_t>(),
        grad_h_n.data_ptr<scalar_t>(), dh_rec.data_ptr<scalar_t>(), dc.data_ptr<acc_t>(),
        gates.data_ptr<scalar_t>(), cell.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), lengths,
        dG_step.data_ptr<scalar_t>(), dG.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    matmul_into(dh_rec, dG_step, w_hh);  // [D, B, 4H] x [D, 4H, H]
  }
  grad_h0.copy_(dh_rec);  // step 0 is valid for every sequence
  grad_c0.copy_(dc);
}

}  // namespace
}  // namespace cnnlstm_ext::lstm
