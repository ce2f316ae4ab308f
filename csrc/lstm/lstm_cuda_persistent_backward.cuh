// The persistent backward recurrence kernel (reverse time).
// Part of the LSTM op's CUDA code, included by lstm_cuda.cu only (one translation unit):
// its definitions live in an anonymous namespace.
#pragma once
#include "lstm/lstm_cuda_products.cuh"

namespace cnnlstm_ext::lstm {
namespace {

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

}  // namespace
}  // namespace cnnlstm_ext::lstm
