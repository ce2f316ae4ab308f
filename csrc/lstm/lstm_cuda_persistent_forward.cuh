// The persistent forward recurrence kernel.
// Part of the LSTM op's CUDA code, included by lstm_cuda.cu only (one translation unit):
// its definitions live in an anonymous namespace.
#pragma once
#include "lstm/lstm_cuda_products.cuh"

namespace cnnlstm_ext::lstm {
namespace {

// ---------------------------------------------------------------------------------------------
// Persistent forward recurrence. Grid: D * nblk CTAs; CTA (dir, blk) owns hidden units
// j0 = blk * HB .. j0 + HB - 1 of direction dir.
// ---------------------------------------------------------------------------------------------
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
                               // barrier (backends.lstm.exchange "tagged"), or null
  scalar_t* y;              // [T, B, D*H]
  scalar_t* h_n;            // [D, B, H]
  scalar_t* c_n;            // [D, B, H]
  scalar_t* gates;          // [T, B, D, 4H] or null (inference)
  scalar_t* cell;           // [T, B, D, H] or null
  unsigned int* barrier;    // [D] arrival counters, zero on entry
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

}  // namespace
}  // namespace cnnlstm_ext::lstm
