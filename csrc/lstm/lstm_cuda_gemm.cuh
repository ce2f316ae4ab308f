// GEMMs of the LSTM op on CUDA (input projection, per-step and gradient products).
// Part of the LSTM op's CUDA code, included by lstm_cuda.cu only (one translation unit):
// its definitions live in an anonymous namespace.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>

#include "lstm/lstm_cuda_common.cuh"

namespace cnnlstm_ext::lstm {
namespace {

// ---------------------------------------------------------------------------------------------
// GEMMs. nn.LSTM on CUDA runs cuDNN's RNN, whose float32 GEMMs use TF32 tensor cores when
// torch.backends.cudnn.allow_tf32 is set (the default); ATen's GEMMs follow
// torch.backends.cuda.matmul.allow_tf32 instead (off by default). So that FusedLSTM computes at
// nn.LSTM's precision, its float32 GEMMs take the cuDNN flag: through ATen when the matmul flag
// gives the same answer, else through cuBLAS with TF32 compute requested explicitly.
// ---------------------------------------------------------------------------------------------
bool tf32_gemms(at::ScalarType dt) {
  const auto& ctx = at::globalContext();
  return dt == at::kFloat && ctx.allowTF32CuDNN() && !ctx.allowTF32CuBLAS();
}

// One operand of a row-major GEMM as cuBLAS sees it: [batch, rows, cols] with one unit stride.
struct GemmOperand {
  bool transposed;  // stored column by column (stride(1) == 1)
  int64_t ld, batch_stride;
};

GemmOperand gemm_operand(const at::Tensor& m, const char* name) {
  TORCH_INTERNAL_ASSERT(m.dim() == 3, name, ": expected a [batch, rows, cols] view");
  if (m.stride(2) == 1 && m.stride(1) >= std::max<int64_t>(1, m.size(2))) return {false, m.stride(1), m.stride(0)};
  TORCH_INTERNAL_ASSERT(m.stride(1) == 1 && m.stride(2) >= std::max<int64_t>(1, m.size(1)), name,
                        ": expected one unit stride, got strides ", m.strides());
  return {true, m.stride(2), m.stride(0)};
}

// out[n] = a[n] . b[n] + beta * out[n] for row-major float32 views a: [N, M, K], b: [N, K, N2],
// out: [N, M, N2] (rows contiguous), TF32 tensor cores. cuBLAS is column-major, so it computes
// out^T = b^T . a^T, reading each row-major operand as its transpose.
void bmm_tf32(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, float beta) {
  const auto A = gemm_operand(a, "a"), Bm = gemm_operand(b, "b"), C = gemm_operand(out, "out");
  TORCH_INTERNAL_ASSERT(!C.transposed);
  const int64_t M = a.size(1), K = a.size(2), N = b.size(2);
  const float alpha = 1.f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, Bm.transposed ? CUBLAS_OP_T : CUBLAS_OP_N, A.transposed ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha,
      b.data_ptr<float>(), CUDA_R_32F, static_cast<int>(Bm.ld), Bm.batch_stride,
      a.data_ptr<float>(), CUDA_R_32F, static_cast<int>(A.ld), A.batch_stride, &beta,
      out.data_ptr<float>(), CUDA_R_32F, static_cast<int>(C.ld), C.batch_stride,
      static_cast<int>(a.size(0)), CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
}

// out = a . b (+ out when accumulate) for 2-D or batched 3-D views, at nn.LSTM's precision.
void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false) {
  if (tf32_gemms(a.scalar_type())) {
    if (a.dim() == 2) {
      auto out3 = out.unsqueeze(0);
      bmm_tf32(a.unsqueeze(0), b.unsqueeze(0), out3, accumulate ? 1.f : 0.f);
    } else {
      bmm_tf32(a, b, out, accumulate ? 1.f : 0.f);
    }
  } else if (a.dim() == 2) {
    accumulate ? out.addmm_(a, b) : at::mm_out(out, a, b);
  } else {
    accumulate ? out.baddbmm_(a, b) : at::bmm_out(out, a, b);
  }
}

// x . w^T: [M, K] x [N, K]^T -> [M, N], at nn.LSTM's precision.
at::Tensor project(const at::Tensor& x, const at::Tensor& w) {
  auto out = at::empty({x.size(0), w.size(0)}, x.options());
  matmul_into(out, x, w.t());
  return out;
}

}  // namespace
}  // namespace cnnlstm_ext::lstm
