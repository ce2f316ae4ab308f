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
// exact float32 FMA. float32 GEMMs use TF32 tensor cores where nn.LSTM would (see matmul_into).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "kernel_trace.h"
#include "lstm_layer.h"
#include "lstm_math.cuh"

namespace cnnlstm_ext {
namespace {

constexpr int kThreads = 256;  // 8 warps per CTA on every path
constexpr int kRT = 4;         // weight rows per warp tile in the recurrent product

__host__ __device__ inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

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

// ---------------------------------------------------------------------------------------------
// Recurrent product on chip: out[b * O + o] = sum_k in[b * K + k] * w[o * K + k]
//   in: [nbp, K] float (shared; rows nb..nbp-1 zero), w: [O, K] (shared), out: [nb, O] float.
// A warp owns a tile of BT batch rows x kRT weight rows; its lanes split K in 4-element chunks
// (16-byte, bank-conflict-free shared loads), then a transposing butterfly reduces the BT*kRT
// partial sums in BT*kRT - 1 + log2(32 / (BT*kRT)) shuffles instead of 5 per value.
// ---------------------------------------------------------------------------------------------
// One halving round: lanes whose bit `M` is set keep the upper HALF values and send the lower
// ones to their partner (lane ^ M), which keeps the lower half; both add what they receive.
template <int HALF, int M, int N>
__device__ __forceinline__ void transpose_round(float (&v)[N], int lane) {
  const bool upper = lane & M;
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const float send = upper ? v[i] : v[i + HALF];
    const float keep = upper ? v[i + HALF] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, M);
  }
  if constexpr (HALF > 1) transpose_round<HALF / 2, M * 2, N>(v, lane);
}

template <int N>
__device__ __forceinline__ float transpose_reduce(float (&v)[N], int lane) {
  if constexpr (N > 1) transpose_round<N / 2, 1, N>(v, lane);
  float s = v[0];
#pragma unroll
  for (int m = N; m < 32; m *= 2) s += __shfl_xor_sync(0xffffffffu, s, m);
  return s;
}

// Which of the N values `transpose_reduce` leaves in `lane`.
template <int N>
__device__ __forceinline__ int transpose_reduce_index(int lane) {
  int idx = 0;
#pragma unroll
  for (int half = N / 2, m = 1; half >= 1; half /= 2, m *= 2)
    if (lane & m) idx += half;
  return idx;
}

template <typename scalar_t, int BT>
__device__ void recurrent_product(const float* in, const scalar_t* w, float* out, int nb, int O,
                                  int K) {
  constexpr int N = BT * kRT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int btiles = (nb + BT - 1) / BT, otiles = O / kRT;
  for (int tile = warp; tile < btiles * otiles; tile += nwarps) {
    const int b0 = (tile / otiles) * BT, o0 = (tile % otiles) * kRT;
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
    for (int k = lane * 4; k < K; k += 128) {
      float hv[BT][4], wv[kRT][4];
#pragma unroll
      for (int bt = 0; bt < BT; ++bt) load4(in + (b0 + bt) * K + k, hv[bt]);
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt) load4(w + (o0 + rt) * K + k, wv[rt]);
#pragma unroll
      for (int bt = 0; bt < BT; ++bt)
#pragma unroll
        for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[bt * kRT + rt] = fmaf(hv[bt][e], wv[rt][e], acc[bt * kRT + rt]);
    }
    const float sum = transpose_reduce<N>(acc, lane);
    if (lane < N) {
      const int idx = transpose_reduce_index<N>(lane);
      const int b = b0 + idx / kRT, o = o0 + idx % kRT;
      if (b < nb) out[b * O + o] = sum;
    }
  }
}

// Stages rows [b0, b0 + nb) of a [B, K] float matrix in global memory into in: [nbp, K] shared,
// zero-filling rows nb..nbp-1. Asynchronous 16-byte copies (cp.async.cg: through L2, not L1,
// since other CTAs wrote the rows since the last step) so that all of a thread's loads are in
// flight at once instead of paying the L2 latency once per row. Followed by a __syncthreads
// in the caller.
__device__ __forceinline__ void stage_rows(float* in, const float* src, int nb, int nbp, int K) {
  for (int idx = threadIdx.x * 4; idx < nbp * K; idx += blockDim.x * 4) {
    if (idx / K < nb) {
      const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(in + idx));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src + idx) : "memory");
    } else {
      *reinterpret_cast<float4*>(in + idx) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// Like stage_rows, from tagged words (lstm_math.cuh) instead of floats published behind a
// barrier: each thread keeps up to kTaggedLoads loads in flight and reloads those whose word does
// not show `step` yet, so the wait for the other CTAs and the load are one L2 round trip.
// Followed by a __syncthreads in the caller.
constexpr int kTaggedLoads = 16;
__device__ __forceinline__ void stage_rows_tagged(float* in, const unsigned long long* src, int nb,
                                                  int nbp, int K, unsigned int step) {
  const int total = nbp * K, valid = nb * K, stride = blockDim.x;
  for (int base = threadIdx.x; base < total; base += stride * kTaggedLoads) {
    unsigned long long w[kTaggedLoads];
    unsigned int pending = 0;  // bit u: element base + u * stride still to read
#pragma unroll
    for (int u = 0; u < kTaggedLoads; ++u) {
      const int idx = base + u * stride;
      if (idx < valid) {
        pending |= 1u << u;
      } else if (idx < total) {
        in[idx] = 0.f;  // rows nb..nbp-1 pad the last batch tile
      }
    }
    const long long start = clock64();
    while (pending != 0) {
      // As in barrier_wait: co-residency is guaranteed, so a wait this long (~30 s) is a bug.
      if (clock64() - start > (1ll << 36)) __trap();
#pragma unroll
      for (int u = 0; u < kTaggedLoads; ++u)
        if (pending & (1u << u)) w[u] = load_word(src + base + u * stride);
      const unsigned int before = pending;
#pragma unroll
      for (int u = 0; u < kTaggedLoads; ++u) {
        if ((pending & (1u << u)) && word_step(w[u]) == step) {
          in[base + u * stride] = word_value(w[u]);
          pending &= ~(1u << u);
        }
      }
      // A round that found nothing new backs off a little, so that the polling of every CTA
      // does not crowd L2 while the last producers finish.
      if (pending == before) __nanosleep(32);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core recurrent product for bfloat16/float16 weights (mma.sync m16n8k16, float32
// accumulation): out[b * O + o] = sum_k in[b * ldi + k] * w[o * ldw + k].
//   w: [Opad, ldw] (shared, rows O..Opad-1 zero), in: [nbp, ldi] (shared, 16-bit, rows nb..nbp-1
//   zero), part: [8, nbp, Opad] float scratch, out: [nb, O] float.
// Rows are padded by 8 elements (16 bytes), so the 8 rows a fragment load touches fall in
// distinct banks. The weight rows are the MMA's A (M = 16 rows of w), the batch its B (N = 8
// sequences); when there are fewer than 8 (row tile, batch tile) pairs, the warps also split K
// and their partial sums are added in a second pass (a fixed order: deterministic).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t ld_shared_u32(const void* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <typename scalar_t>
__device__ __forceinline__ void store4_16bit(scalar_t* dst, float4 v) {
  uint2 packed;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    packed.x = *reinterpret_cast<uint32_t*>(&lo);
    packed.y = *reinterpret_cast<uint32_t*>(&hi);
  } else {
    __half2 lo = __floats2half2_rn(v.x, v.y), hi = __floats2half2_rn(v.z, v.w);
    packed.x = *reinterpret_cast<uint32_t*>(&lo);
    packed.y = *reinterpret_cast<uint32_t*>(&hi);
  }
  *reinterpret_cast<uint2*>(dst) = packed;
}

// Like stage_rows, converting to the 16-bit MMA operand type into rows of stride ldi. Eight
// 16-byte loads per thread are in flight before the first conversion.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows_16bit(scalar_t* in, int ldi, const float* src, int nb,
                                                 int nbp, int K) {
  constexpr int U = 8;
  const int total = nbp * K, stride = blockDim.x * 4;
  for (int base = threadIdx.x * 4; base < total; base += stride * U) {
    float4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = base + u * stride;
      v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (idx < total && idx / K < nb) v[u] = __ldcg(reinterpret_cast<const float4*>(src + idx));
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = base + u * stride;
      if (idx < total) store4_16bit(in + (idx / K) * ldi + idx % K, v[u]);
    }
  }
}

template <typename scalar_t>
__device__ void recurrent_product_mma(const scalar_t* in, int ldi, const scalar_t* w, int ldw,
                                      float* part, float* out, int nb, int nbp, int O, int Opad,
                                      int K) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int MT = Opad / 16, NT = nbp / 8, P = MT * NT;
  const int S = P >= nwarps ? 1 : nwarps / P;  // K slices
  const int ksteps = K / 16, per = (ksteps + S - 1) / S;
  for (int work = warp; work < P * S; work += nwarps) {
    const int pair = work % P, slice = work / P;
    const int mt = pair % MT, nt = pair / MT;
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    const scalar_t* wa = w + (mt * 16 + g) * ldw + 2 * t;
    const scalar_t* ib = in + (nt * 8 + g) * ldi + 2 * t;
    const int k_end = min(ksteps, (slice + 1) * per);
    for (int ks = slice * per; ks < k_end; ++ks) {
      const int k0 = ks * 16;
      const uint32_t a[4] = {ld_shared_u32(wa + k0), ld_shared_u32(wa + 8 * ldw + k0),
                             ld_shared_u32(wa + k0 + 8), ld_shared_u32(wa + 8 * ldw + k0 + 8)};
      const uint32_t b[2] = {ld_shared_u32(ib + k0), ld_shared_u32(ib + k0 + 8)};
      mma_16816<scalar_t>(c, a, b);
    }
    // c[0]: (row mt*16+g, column nt*8+2t), c[1]: column + 1, c[2], c[3]: row + 8.
    float* pp = part + static_cast<size_t>(slice) * nbp * Opad;
    const int o = mt * 16 + g, b = nt * 8 + 2 * t;
    pp[b * Opad + o] = c[0];
    pp[(b + 1) * Opad + o] = c[1];
    pp[b * Opad + o + 8] = c[2];
    pp[(b + 1) * Opad + o + 8] = c[3];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nb * O; idx += blockDim.x) {
    const int b = idx / O, o = idx % O;
    float sum = 0.f;
    for (int sl = 0; sl < S; ++sl) sum += part[(static_cast<size_t>(sl) * nbp + b) * Opad + o];
    out[b * O + o] = sum;
  }
}

// Where a step reads the matrix the CTAs of a direction exchange ([B, K], in global memory):
// float rows published behind the barrier, or tagged words (forward only, FMA product) that are
// read until they show `step`.
struct ExchangeSource {
  const float* rows = nullptr;
  const unsigned long long* words = nullptr;
  unsigned int step = 0;
};

// The product of the matrix the CTAs of a direction exchange each step (h_{s-1}: [B, K] forward,
// dG_{s+1}: [B, K] backward) with this CTA's weights w_s, staged in chunks of BC rows:
// out[b * O + o] for all b < B. Every thread of the CTA calls it.
template <typename scalar_t, int BT, bool MMA>
__device__ void exchanged_product(unsigned char* in_s, int ldi, const ExchangeSource& src,
                                  const scalar_t* w_s, int ldw, float* part, float* out, int B,
                                  int BC, int O, int Opad, int K) {
  for (int b0 = 0; b0 < B; b0 += BC) {
    const int nb = min(BC, B - b0);
    const size_t offset = static_cast<size_t>(b0) * K;
    if constexpr (MMA) {
      const int nbp = static_cast<int>(round_up(nb, 8));
      stage_rows_16bit(reinterpret_cast<scalar_t*>(in_s), ldi, src.rows + offset, nb, nbp, K);
      __syncthreads();
      recurrent_product_mma(reinterpret_cast<const scalar_t*>(in_s), ldi, w_s, ldw, part, out + b0 * O,
                            nb, nbp, O, Opad, K);
    } else {
      const int nbp = static_cast<int>(round_up(nb, BT));
      if (src.words != nullptr) {
        stage_rows_tagged(reinterpret_cast<float*>(in_s), src.words + offset, nb, nbp, K, src.step);
      } else {
        stage_rows(reinterpret_cast<float*>(in_s), src.rows + offset, nb, nbp, K);
      }
      __syncthreads();
      recurrent_product<scalar_t, BT>(reinterpret_cast<const float*>(in_s), w_s, out + b0 * O, nb, O, K);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Persistent forward recurrence. Grid: D * nblk CTAs; CTA (dir, blk) owns hidden units
// j0 = blk * HB .. j0 + HB - 1 of direction dir.
// ---------------------------------------------------------------------------------------------
// Launch geometry shared by both persistent kernels (filled from a PersistentPlan).
struct PersistentGeometry {
  int T, B, H, D, HB, nblk, BC;
  int ldw, ldi;                              // row strides of w_s and in_s (elements)
  int off_in, off_pre, off_state, off_part;  // shared-memory byte offsets (off_pre: forward only)
};

template <typename scalar_t>
struct PersistentForwardParams : PersistentGeometry {
  const scalar_t* xproj;    // [T, B, D, 4H] input projection, without the bias
  const scalar_t* bias;     // [D, 4H] (b_ih + b_hh) or null
  const scalar_t* w_hh;     // [D, 4H, H]
  const float* h0;          // [D, B, H] h0 in float32 (read at step 0 only)
  const scalar_t* c0;       // [D, B, H]
  const int64_t* lengths;   // [B] or null
  float* hbuf;              // [2, D, B, H] h exchange buffers (slot 0 unused at step 0)
  unsigned long long* hwords;  // [2, D, B, H] tagged exchange words instead of hbuf and the
                               // barrier (CNNLSTM_EXT_LSTM_EXCHANGE=tagged), or null
  scalar_t* y;              // [T, B, D*H]
  scalar_t* h_n;            // [D, B, H]
  scalar_t* c_n;            // [D, B, H]
  scalar_t* gates;          // [T, B, D, 4H] or null (inference)
  scalar_t* cell;           // [T, B, D, H] or null
  unsigned int* barrier;    // [D] arrival counters, zero on entry
};

// What one (b, u) pair reads from global memory at one step, loaded ahead of the barrier.
struct StepInput {
  float v[8];
};

// Input projection plus bias of gates i, f, g, o for pair q = b * HB + u at step s (zeros past
// the length).
template <typename scalar_t>
__device__ __forceinline__ StepInput load_forward_input(const PersistentForwardParams<scalar_t>& p,
                                                        int q, int s) {
  StepInput in{};
  const int dir = blockIdx.x / p.nblk, b = q / p.HB, j = (blockIdx.x % p.nblk) * p.HB + q % p.HB;
  const int len = seq_length(p.lengths, b, p.T);
  if (s < len) {
    const int t = time_index(dir, s, len);
    const scalar_t* xr = p.xproj + ((static_cast<size_t>(t) * p.B + b) * p.D + dir) * 4 * p.H;
#pragma unroll
    for (int g = 0; g < 4; ++g) in.v[g] = static_cast<float>(xr[g * p.H + j]);
    if (p.bias != nullptr) {
      const scalar_t* br = p.bias + static_cast<size_t>(dir) * 4 * p.H;
#pragma unroll
      for (int g = 0; g < 4; ++g) in.v[g] += static_cast<float>(br[g * p.H + j]);
    }
  }
  return in;
}

template <typename scalar_t, int BT, bool MMA>
__global__ void __launch_bounds__(kThreads, 1)
    lstm_forward_persistent_kernel(const PersistentForwardParams<scalar_t> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int dir = blockIdx.x / p.nblk, blk = blockIdx.x % p.nblk;
  const int H = p.H, HB = p.HB, O = 4 * HB, G = 4 * H, B = p.B, D = p.D, j0 = blk * HB;
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);                 // [O, ldw] rows of w_hh
  unsigned char* in_s = smem + p.off_in;                             // [BCpad, ldi] h_{s-1} chunk
  float* part = reinterpret_cast<float*>(smem + p.off_part);        // MMA partial sums
  float* pre_s = reinterpret_cast<float*>(smem + p.off_pre);        // [B, O] h_{s-1} . w^T
  float* h_s = reinterpret_cast<float*>(smem + p.off_state);        // [B, HB] own slice of h
  float* c_s = h_s + B * HB;                                         // [B, HB] own slice of c

  // Row o of w_s is gate o / HB of hidden unit j0 + o % HB.
  const scalar_t* w = p.w_hh + static_cast<size_t>(dir) * G * H;
  for (int idx = threadIdx.x; idx < O * H; idx += blockDim.x) {
    const int o = idx / H, k = idx % H;
    w_s[o * p.ldw + k] = w[static_cast<size_t>((o / HB) * H + j0 + o % HB) * H + k];
  }
  for (int q = threadIdx.x; q < B * HB; q += blockDim.x) {
    const int b = q / HB, j = j0 + q % HB;
    h_s[q] = p.h0[(static_cast<size_t>(dir) * B + b) * H + j];
    c_s[q] = static_cast<float>(p.c0[(static_cast<size_t>(dir) * B + b) * H + j]);
  }
  __syncthreads();

  // When every (b, u) pair has its own thread (the common case), the thread loads the input
  // projection of its next step between arriving at and waiting on the barrier, so the load
  // latency hides behind the wait.
  const bool own_pair = B * HB <= static_cast<int>(blockDim.x);
  StepInput next{};
  if (own_pair && threadIdx.x < B * HB) next = load_forward_input(p, threadIdx.x, 0);
  // h_s goes to slot (s + 1) & 1 (tagged: with step s + 1); step s reads slot s & 1 (h0 at s = 0).
  const bool tagged = p.hwords != nullptr;
  for (int s = 0; s < p.T; ++s) {
    if (s > 0 && !tagged) barrier_wait(p.barrier + dir, static_cast<unsigned int>(s * p.nblk));
    const size_t slot_in = (static_cast<size_t>(s & 1) * D + dir) * B * H;
    const size_t slot_out = (static_cast<size_t>((s + 1) & 1) * D + dir) * B * H;
    ExchangeSource h_in;
    if (s == 0) {
      h_in.rows = p.h0 + static_cast<size_t>(dir) * B * H;
    } else if (tagged) {
      h_in.words = p.hwords + slot_in;
      h_in.step = static_cast<unsigned int>(s);
    } else {
      h_in.rows = p.hbuf + slot_in;
    }
    exchanged_product<scalar_t, BT, MMA>(in_s, p.ldi, h_in, w_s, p.ldw, part, pre_s, B, p.BC, O, O, H);
    for (int q = threadIdx.x; q < B * HB; q += blockDim.x) {
      const int b = q / HB, u = q % HB, j = j0 + u;
      const int len = seq_length(p.lengths, b, p.T);
      if (s < len) {
        const int t = time_index(dir, s, len);
        const size_t row = (static_cast<size_t>(t) * B + b) * D + dir;
        const StepInput in = own_pair ? next : load_forward_input(p, q, s);
        const float* pr = pre_s + b * O;
        const float gi = sigmoid_(pr[u] + in.v[0]);
        const float gf = sigmoid_(pr[HB + u] + in.v[1]);
        const float gg = tanh_(pr[2 * HB + u] + in.v[2]);
        const float go = sigmoid_(pr[3 * HB + u] + in.v[3]);
        const float c = gf * c_s[q] + gi * gg;
        const float h = go * tanh_(c);
        c_s[q] = c;
        h_s[q] = h;
        p.y[(static_cast<size_t>(t) * B + b) * D * H + dir * H + j] = static_cast<scalar_t>(h);
        if (p.gates != nullptr) {
          scalar_t* gr = p.gates + row * G;
          gr[j] = static_cast<scalar_t>(gi);
          gr[H + j] = static_cast<scalar_t>(gf);
          gr[2 * H + j] = static_cast<scalar_t>(gg);
          gr[3 * H + j] = static_cast<scalar_t>(go);
          p.cell[row * H + j] = static_cast<scalar_t>(c);
        }
      } else {
        // Time s is padding for b (s >= len): every padded time is visited exactly once here.
        const size_t row = (static_cast<size_t>(s) * B + b) * D + dir;
        p.y[(static_cast<size_t>(s) * B + b) * D * H + dir * H + j] = static_cast<scalar_t>(0.f);
        if (p.gates != nullptr) {
          scalar_t* gr = p.gates + row * G;
          gr[j] = gr[H + j] = gr[2 * H + j] = gr[3 * H + j] = static_cast<scalar_t>(0.f);
          p.cell[row * H + j] = static_cast<scalar_t>(0.f);
        }
      }
      // Finished sequences carry their state.
      if (tagged) {
        store_word(p.hwords + slot_out + static_cast<size_t>(b) * H + j,
                   tagged_word(h_s[q], static_cast<unsigned int>(s + 1)));
      } else {
        p.hbuf[slot_out + static_cast<size_t>(b) * H + j] = h_s[q];
      }
    }
    if (s + 1 < p.T) {
      if (!tagged) barrier_arrive(p.barrier + dir);
      if (own_pair && threadIdx.x < B * HB) next = load_forward_input(p, threadIdx.x, s + 1);
    }
  }
  __syncthreads();
  for (int q = threadIdx.x; q < B * HB; q += blockDim.x) {
    const int b = q / HB, j = j0 + q % HB;
    p.h_n[(static_cast<size_t>(dir) * B + b) * H + j] = static_cast<scalar_t>(h_s[q]);
    p.c_n[(static_cast<size_t>(dir) * B + b) * H + j] = static_cast<scalar_t>(c_s[q]);
  }
}

// ---------------------------------------------------------------------------------------------
// Persistent backward recurrence (reverse time). CTA (dir, blk) owns hidden units j0..j0+HB-1:
// it keeps columns j0..j0+HB-1 of w_hh (as rows of w_s: [HB, 4H]), computes the gate gradients
// of its units, publishes them, and after the barrier multiplies the full dG_s: [B, 4H] of its
// direction by its columns, giving its slice of the gradient reaching h_{s-1}.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct PersistentBackwardParams : PersistentGeometry {
  const scalar_t* grad_y;    // [T, B, D*H]
  const scalar_t* grad_h_n;  // [D, B, H]
  const scalar_t* grad_c_n;  // [D, B, H]
  const scalar_t* gates;     // [T, B, D, 4H]
  const scalar_t* cell;      // [T, B, D, H]
  const scalar_t* c0;        // [D, B, H]
  const scalar_t* w_hh;      // [D, 4H, H]
  const int64_t* lengths;    // [B] or null
  float* dgbuf;              // [2, D, B, 4H] gate-gradient exchange buffers
  scalar_t* dG;              // [T, B, D, 4H] out: pre-activation gate gradients (0 on padding)
  scalar_t* grad_h0;         // [D, B, H]
  scalar_t* grad_c0;         // [D, B, H]
  unsigned int* barrier;     // [D], zero on entry
};

// For pair q = b * HB + u at step s: gates i, f, g, o, c_t, c_{t-1} (c0 at the first step),
// grad_y and grad_h_n (used only at b's first processed step).
template <typename scalar_t>
__device__ __forceinline__ StepInput load_backward_input(const PersistentBackwardParams<scalar_t>& p,
                                                         int q, int s) {
  StepInput in{};
  const int dir = blockIdx.x / p.nblk, b = q / p.HB, j = (blockIdx.x % p.nblk) * p.HB + q % p.HB;
  const int len = seq_length(p.lengths, b, p.T), H = p.H, B = p.B, D = p.D;
  if (s < len) {
    const int t = time_index(dir, s, len);
    const size_t row = (static_cast<size_t>(t) * B + b) * D + dir;
    const size_t state = (static_cast<size_t>(dir) * B + b) * H + j;
#pragma unroll
    for (int g = 0; g < 4; ++g) in.v[g] = static_cast<float>(p.gates[row * 4 * H + g * H + j]);
    in.v[4] = static_cast<float>(p.cell[row * H + j]);
    in.v[5] = static_cast<float>(
        s == 0 ? p.c0[state]
               : p.cell[((static_cast<size_t>(time_index(dir, s - 1, len)) * B + b) * D + dir) * H + j]);
    in.v[6] = static_cast<float>(p.grad_y[(static_cast<size_t>(t) * B + b) * D * H + dir * H + j]);
    in.v[7] = s + 1 < len ? 0.f : static_cast<float>(p.grad_h_n[state]);
  }
  return in;
}

template <typename scalar_t, int BT, bool MMA>
__global__ void __launch_bounds__(kThreads, 1)
    lstm_backward_persistent_kernel(const PersistentBackwardParams<scalar_t> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int dir = blockIdx.x / p.nblk, blk = blockIdx.x % p.nblk;
  const int H = p.H, HB = p.HB, G = 4 * H, B = p.B, D = p.D, j0 = blk * HB;
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);             // [HB(pad), ldw] = w_hh[:, j0:j0+HB]^T
  unsigned char* in_s = smem + p.off_in;                         // [BCpad, ldi] dG chunk
  float* part = reinterpret_cast<float*>(smem + p.off_part);    // MMA partial sums
  const int Opad = MMA ? static_cast<int>(round_up(HB, 16)) : HB;
  float* dh_s = reinterpret_cast<float*>(smem + p.off_state);   // [B, HB] recurrent dh slice
  float* dc_s = dh_s + B * HB;                                   // [B, HB] dc carried back

  const scalar_t* w = p.w_hh + static_cast<size_t>(dir) * G * H;
  for (int idx = threadIdx.x; idx < HB * G; idx += blockDim.x) {
    const int k = idx / HB, u = idx % HB;  // consecutive threads read consecutive columns
    w_s[u * p.ldw + k] = w[static_cast<size_t>(k) * H + j0 + u];
  }
  // Rows HB..Opad-1 pad the MMA's 16-row tile with zeros.
  for (int idx = threadIdx.x; idx < (Opad - HB) * G; idx += blockDim.x)
    w_s[(HB + idx / G) * p.ldw + idx % G] = static_cast<scalar_t>(0.f);
  for (int q = threadIdx.x; q < B * HB; q += blockDim.x) {
    const int b = q / HB, j = j0 + q % HB;
    dh_s[q] = 0.f;
    dc_s[q] = static_cast<float>(p.grad_c_n[(static_cast<size_t>(dir) * B + b) * H + j]);
  }
  __syncthreads();

  const bool own_pair = B * HB <= static_cast<int>(blockDim.x);
  StepInput next{};
  if (own_pair && threadIdx.x < B * HB) next = load_backward_input(p, threadIdx.x, p.T - 1);
  for (int it = 0; it <= p.T; ++it) {
    const int s = p.T - 1 - it;
    if (it > 0) {
      barrier_wait(p.barrier + dir, static_cast<unsigned int>(it * p.nblk));
      // dG of step s + 1 (all CTAs of this direction) -> dh_s = dG_{s+1} . w_hh[:, own units]
      ExchangeSource g_in;
      g_in.rows = p.dgbuf + (static_cast<size_t>((it - 1) & 1) * D + dir) * B * G;
      exchanged_product<scalar_t, BT, MMA>(in_s, p.ldi, g_in, w_s, p.ldw, part, dh_s, B, p.BC, HB, Opad, G);
    }
    if (s < 0) break;
    float* g_out = p.dgbuf + (static_cast<size_t>(it & 1) * D + dir) * B * G;
    for (int q = threadIdx.x; q < B * HB; q += blockDim.x) {
      const int b = q / HB, u = q % HB, j = j0 + u;
      const int len = seq_length(p.lengths, b, p.T);
      float* go_row = g_out + static_cast<size_t>(b) * G;
      if (s < len) {
        const int t = time_index(dir, s, len);
        const size_t row = (static_cast<size_t>(t) * B + b) * D + dir;
        const StepInput in = own_pair ? next : load_backward_input(p, q, s);
        const float gi = in.v[0], gf = in.v[1], gg = in.v[2], go = in.v[3];
        const float tc = tanh_(in.v[4]);
        const float c_prev = in.v[5];
        // The first step processed for b (its last in time) starts from grad_h_n.
        const float dh = in.v[6] + ((s + 1 < len) ? dh_s[q] : in.v[7]);
        const float dc = dc_s[q] + dh * go * (1.f - tc * tc);
        const float di = dc * gg * gi * (1.f - gi);
        const float df = dc * c_prev * gf * (1.f - gf);
        const float dg = dc * gi * (1.f - gg * gg);
        const float d_o = dh * tc * go * (1.f - go);
        dc_s[q] = dc * gf;
        scalar_t* dr = p.dG + row * G;
        dr[j] = static_cast<scalar_t>(di);
        dr[H + j] = static_cast<scalar_t>(df);
        dr[2 * H + j] = static_cast<scalar_t>(dg);
        dr[3 * H + j] = static_cast<scalar_t>(d_o);
        go_row[j] = di; go_row[H + j] = df; go_row[2 * H + j] = dg; go_row[3 * H + j] = d_o;
      } else {
        scalar_t* dr = p.dG + ((static_cast<size_t>(s) * B + b) * D + dir) * G;
        dr[j] = dr[H + j] = dr[2 * H + j] = dr[3 * H + j] = static_cast<scalar_t>(0.f);
        go_row[j] = 0.f; go_row[H + j] = 0.f; go_row[2 * H + j] = 0.f; go_row[3 * H + j] = 0.f;
      }
    }
    barrier_arrive(p.barrier + dir);
    if (s > 0 && own_pair && threadIdx.x < B * HB) next = load_backward_input(p, threadIdx.x, s - 1);
  }
  __syncthreads();
  // Step 0 is valid for every sequence, so dh_s now holds grad_h0 for all rows.
  for (int q = threadIdx.x; q < B * HB; q += blockDim.x) {
    const int b = q / HB, j = j0 + q % HB;
    p.grad_h0[(static_cast<size_t>(dir) * B + b) * H + j] = static_cast<scalar_t>(dh_s[q]);
    p.grad_c0[(static_cast<size_t>(dir) * B + b) * H + j] = static_cast<scalar_t>(dc_s[q]);
  }
}

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

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
int grid_for(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 8)));
}

enum class RecurrencePath { kAuto, kPersistent, kStepwise };

// CNNLSTM_EXT_LSTM_PATH=auto|persistent|stepwise (tests and benchmarks force a path);
// CNNLSTM_EXT_PERSISTENT_MAX_BATCH (default 32) bounds the batch the persistent path takes in auto.
RecurrencePath requested_path() {
  const char* v = std::getenv("CNNLSTM_EXT_LSTM_PATH");
  if (v == nullptr || std::strcmp(v, "auto") == 0 || v[0] == '\0') return RecurrencePath::kAuto;
  if (std::strcmp(v, "persistent") == 0) return RecurrencePath::kPersistent;
  if (std::strcmp(v, "stepwise") == 0) return RecurrencePath::kStepwise;
  TORCH_CHECK(false, "CNNLSTM_EXT_LSTM_PATH must be auto, persistent or stepwise, got '", v, "'");
}

int64_t persistent_max_batch() {
  const char* v = std::getenv("CNNLSTM_EXT_PERSISTENT_MAX_BATCH");
  return v ? std::atoll(v) : 32;
}

// CNNLSTM_EXT_LSTM_EXCHANGE=barrier|tagged: how the CTAs of the persistent forward recurrence pass
// h between steps. barrier (default): float rows and a per-direction flag barrier. tagged: each
// element carries the step that wrote it in a 64-bit word, and readers wait on the data itself
// (one L2 round trip per step instead of two, no fence); FMA product only.
bool want_tagged_exchange() {
  const char* v = std::getenv("CNNLSTM_EXT_LSTM_EXCHANGE");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "barrier") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "tagged") == 0,
              "CNNLSTM_EXT_LSTM_EXCHANGE must be barrier or tagged, got '", v, "'");
  return true;
}

// CNNLSTM_EXT_PERSISTENT_MIN_HB: the fewest hidden units per CTA a persistent plan may use
// (default: any). Larger slices mean fewer CTAs per barrier and less staging traffic, but more
// product per CTA; benchmarks sweep it.
int persistent_min_hb() {
  const char* v = std::getenv("CNNLSTM_EXT_PERSISTENT_MIN_HB");
  return v ? std::atoi(v) : 0;
}

// Launch geometry of a persistent recurrence; ok=false when it cannot run co-resident, and then
// why_not says why (the error of a forced persistent path).
struct PersistentPlan {
  bool ok = false;
  std::string why_not;
  bool mma = false;
  int HB = 0, nblk = 0, BC = 0, BT = 0, ldw = 0, ldi = 0;
  int off_in = 0, off_pre = 0, off_state = 0, off_part = 0;
  size_t smem = 0;

  PersistentGeometry geometry(const LstmDims& d) const {
    return {static_cast<int>(d.T), static_cast<int>(d.B), static_cast<int>(d.H), static_cast<int>(d.D),
            HB, nblk, BC, ldw, ldi, off_in, off_pre, off_state, off_part};
  }
};

template <typename Kernel>
bool fits_coresident(Kernel kernel, size_t smem, int grid) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (smem > prop->sharedMemPerBlockOptin) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  return per_sm * prop->multiProcessorCount >= grid;
}

// Tensor cores for the recurrent product of 16-bit weights with CNNLSTM_EXT_LSTM_MMA=1; the FMA
// product otherwise. Opt-in: on an H200 it passed every parity test but was faster than the FMA
// product only for bfloat16 inference at B >= 32 (benchmarks/RESULTS.md, "recurrence variants").
template <typename scalar_t>
bool want_mma() {
  if constexpr (sizeof(scalar_t) != 2) {
    return false;
  } else {
    const char* v = std::getenv("CNNLSTM_EXT_LSTM_MMA");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }
}

// Shared memory, in order: w_s (own rows of w_hh, or own columns in backward), the staged chunk
// of the exchanged matrix (h_{s-1}: [BC, H] forward, dG_{s+1}: [BC, 4H] backward), the forward's
// recurrent product [B, 4HB], the own state slices [2, B, HB], and the MMA partial sums.
// The smallest HB (most CTAs) whose grid can be co-resident wins.
template <typename scalar_t, typename KernelFor>
PersistentPlan plan_persistent_uncached(const LstmDims& d, bool forward, bool mma, int min_hb,
                                        KernelFor kernel_for) {
  PersistentPlan plan;
  if (d.H % 32 != 0) {
    plan.why_not = "the hidden size " + std::to_string(d.H) + " is not a multiple of 32";
    return plan;
  }
  if (d.B > 1024) {
    plan.why_not = "the batch " + std::to_string(d.B) + " exceeds 1024";
    return plan;
  }
  const int BT = mma ? 8 : (d.B == 1 ? 1 : 4);       // batch rows per tile
  const int64_t K = forward ? d.H : 4 * d.H;          // reduction length of the product
  const int64_t in_elem = mma ? sizeof(scalar_t) : 4;
  const int64_t pad = mma ? 8 : 0;                    // row padding (elements) for the MMA loads
  for (int HB : {4, 8, 16, 32, 64}) {
    if (d.H % HB != 0 || HB < min_hb) continue;
    const int nblk = static_cast<int>(d.H / HB);
    const int grid = static_cast<int>(d.D) * nblk;
    const int64_t O = forward ? 4 * HB : HB;
    const int64_t Opad = mma ? round_up(O, 16) : O;
    // Stage up to 96 KiB of the exchanged matrix at a time.
    int64_t BC = std::max<int64_t>(BT, (98304 / ((K + pad) * in_elem)) / BT * BT);
    BC = std::min<int64_t>(BC, round_up(d.B, BT));
    const int64_t w_bytes = round_up(Opad * (K + pad) * static_cast<int64_t>(sizeof(scalar_t)), 16);
    const int64_t in_bytes = round_up(BC * (K + pad) * in_elem, 16);
    const int64_t pre_bytes = forward ? round_up(d.B * O * 4, 16) : 0;
    const int64_t state_bytes = round_up(2 * d.B * HB * 4, 16);
    const int64_t part_bytes = mma ? 4 * std::max<int64_t>(1024, BC * Opad) : 0;
    plan.ldw = static_cast<int>(K + pad);
    plan.ldi = static_cast<int>(K + pad);
    plan.off_in = static_cast<int>(w_bytes);
    plan.off_pre = static_cast<int>(w_bytes + in_bytes);
    plan.off_state = static_cast<int>(w_bytes + in_bytes + pre_bytes);
    plan.off_part = static_cast<int>(w_bytes + in_bytes + pre_bytes + state_bytes);
    plan.smem = static_cast<size_t>(w_bytes + in_bytes + pre_bytes + state_bytes + part_bytes);
    if (fits_coresident(kernel_for(BT, mma), plan.smem, grid)) {
      plan.ok = true;
      plan.mma = mma;
      plan.HB = HB;
      plan.nblk = nblk;
      plan.BC = static_cast<int>(BC);
      plan.BT = BT;
      return plan;
    }
  }
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  plan.why_not = std::string("no slice of hidden units (4 to 64 units per block, at least ") +
                 std::to_string(min_hb) + ") fits " + std::to_string(d.D) + " x H/slice blocks of " +
                 (mma ? "the tensor-core" : "the FMA") + " kernel co-resident on this GPU (" +
                 std::to_string(prop->multiProcessorCount) + " SMs, " +
                 std::to_string(prop->sharedMemPerBlockOptin) + " bytes of shared memory per block)";
  return plan;
}

// Plans are cached per device and shape: planning queries the driver (occupancy, attributes).
template <typename scalar_t, typename KernelFor>
PersistentPlan plan_persistent(const LstmDims& d, bool forward, KernelFor kernel_for) {
  using Key = std::tuple<int, bool, bool, int, int, int64_t, int64_t, int64_t>;
  static std::mutex mutex;
  static std::map<Key, PersistentPlan> cache;
  const bool mma = want_mma<scalar_t>();
  const int min_hb = persistent_min_hb();
  // Keyed by dtype, not size: float16 and bfloat16 are different kernels.
  const Key key{c10::cuda::current_device(), forward, mma, min_hb,
                static_cast<int>(c10::CppTypeToScalarType<scalar_t>::value), d.B, d.H, d.D};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    it = cache.emplace(key, plan_persistent_uncached<scalar_t>(d, forward, mma, min_hb, kernel_for)).first;
  }
  return it->second;
}

bool use_persistent(const LstmDims& d, at::ScalarType dt) {
  const auto path = requested_path();
  TORCH_CHECK(dt != at::kDouble || path != RecurrencePath::kPersistent,
              "CNNLSTM_EXT_LSTM_PATH=persistent, but the persistent kernel has no float64 "
              "version; unset it (float64 takes the per-step path)");
  if (dt == at::kDouble) return false;
  switch (path) {
    case RecurrencePath::kStepwise: return false;
    case RecurrencePath::kPersistent: return true;
    default: return d.B <= persistent_max_batch();
  }
}

// A plan that cannot run falls back to the per-step path when the path was chosen automatically;
// a forced persistent path is an error that says why, never a silent fallback.
bool persistent_plan_usable(const PersistentPlan& plan, const char* op) {
  if (plan.ok) return true;
  TORCH_CHECK(requested_path() != RecurrencePath::kPersistent, op,
              ": CNNLSTM_EXT_LSTM_PATH=persistent, but the persistent kernel cannot run this layer: ",
              plan.why_not, "; unset it to let the per-step path take this shape");
  return false;
}

// The exchange buffers of a persistent recurrence in one allocation: [2, exchange] float32
// elements and D barrier counters (zeroed on the current stream), or, tagged, [2, exchange]
// tagged words (all set to step 0xffffffff, which no step waits for) and [exchange] float32
// scratch.
struct ExchangeBuffers {
  at::Tensor storage;
  float* data = nullptr;
  unsigned long long* words = nullptr;
  float* scratch = nullptr;
  unsigned int* barrier = nullptr;
};

ExchangeBuffers exchange_buffers(int64_t exchange, int64_t D, const at::Tensor& like,
                                 bool tagged = false) {
  ExchangeBuffers e;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (tagged) {
    e.storage = at::empty({5 * exchange}, like.options().dtype(at::kFloat));  // 8-byte aligned
    e.words = reinterpret_cast<unsigned long long*>(e.storage.data_ptr<float>());
    e.scratch = e.storage.data_ptr<float>() + 4 * exchange;
    C10_CUDA_CHECK(cudaMemsetAsync(e.words, 0xff, 2 * exchange * sizeof(unsigned long long), stream));
    return e;
  }
  e.storage = at::empty({2 * exchange + D}, like.options().dtype(at::kFloat));
  e.data = e.storage.data_ptr<float>();
  e.scratch = e.data;  // slot 0, first written at step 1
  e.barrier = reinterpret_cast<unsigned int*>(e.data + 2 * exchange);
  C10_CUDA_CHECK(cudaMemsetAsync(e.barrier, 0, D * sizeof(unsigned int), stream));
  return e;
}

void launch_cooperative(const void* kernel, int grid, size_t smem, void* params) {
  // The shared-memory limit is a property of the kernel function, shared by every plan that uses
  // it: set it to this plan's size at each launch (a plan made later for another shape may have
  // lowered it, and a too-small limit fails the launch as "too many blocks").
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  void* args[] = {params};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(grid), dim3(kThreads), args, smem,
                                             at::cuda::getCurrentCUDAStream()));
}

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
  const bool tagged = want_tagged_exchange();
  TORCH_CHECK(!tagged || !plan.mma, "CNNLSTM_EXT_LSTM_EXCHANGE=tagged needs the FMA product of "
              "the persistent kernel; unset CNNLSTM_EXT_LSTM_MMA");
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
  record_kernel(std::string("cuda:lstm_forward:persistent:") + (plan.mma ? "mma" : "fma") + ":" +
                (tagged ? "tagged" : "barrier"));
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
  record_kernel(std::string("cuda:lstm_backward:persistent:") + (plan.mma ? "mma" : "fma") +
                ":barrier");
  return true;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cuda(
    const at::Tensor& x_in, at::TensorList weights, const at::Tensor& h0_in,
    const at::Tensor& c0_in, const c10::optional<at::Tensor>& lengths, bool train) {
  // Autocast must not reach the ATen calls below (they must run in the dtypes chosen here);
  // the Python wrapper applies autocast's dtype before the op.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "lstm_layer_forward";
  const auto [w_ih_in, w_hh_in, bias_t, wdt] = layer_weights(op, x_in, weights, h0_in);
  const auto bias = bias_t.defined() ? c10::optional<at::Tensor>(bias_t) : c10::nullopt;
  const auto d = check_lstm_inputs(op, x_in, w_ih_in, w_hh_in, bias, h0_in, c0_in, lengths);
  TORCH_CHECK(x_in.is_cuda(), "lstm_layer_forward: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, G = 4 * H;
  const auto dt = x_in.scalar_type();
  auto x = x_in.contiguous();
  auto w_ih = w_ih_in.contiguous();
  auto w_hh = w_hh_in.contiguous();
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
                         const c10::optional<at::Tensor>& lengths, const at::Tensor& y_in,
                         const at::Tensor& gates_in, const at::Tensor& cell_in) {
  // Autocast must not reach the ATen calls below (they must run in the dtypes chosen here);
  // the Python wrapper applies autocast's dtype before the op.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "lstm_layer_backward";
  const auto [w_ih_in, w_hh_in, no_bias, wdt] =
      layer_weights(op, x_in, weights, h0_in, /*with_bias=*/false);
  const auto d = check_lstm_inputs(op, x_in, w_ih_in, w_hh_in, c10::nullopt, h0_in, c0_in, lengths);
  check_lstm_backward_inputs(op, d, x_in, grad_y_in, grad_h_n_in, grad_c_n_in, y_in, gates_in,
                             cell_in);
  TORCH_CHECK(x_in.is_cuda(), "lstm_layer_backward: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, G = 4 * H;
  const auto dt = x_in.scalar_type();
  auto grad_y = grad_y_in.contiguous();
  auto grad_h_n = grad_h_n_in.contiguous();
  auto grad_c_n = grad_c_n_in.contiguous();
  auto x = x_in.contiguous();
  auto w_ih = w_ih_in.contiguous();
  auto w_hh = w_hh_in.contiguous();
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
  auto grad_x = at::empty({T, B, d.I}, x.options());
  auto grad_x_2d = grad_x.view({T * B, d.I});
  matmul_into(grad_x_2d, dG_mm, w_ih.view({D * G, d.I}));
  // Weight gradients in the dtype the weights came in (float32 master weights under autocast).
  return {grad_x, grad_w_ih.to(wdt), grad_w_hh.to(wdt), grad_bias, grad_h0, grad_c0};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
}

}  // namespace cnnlstm_ext
