// The recurrent products on chip (FMA warp tiles, tensor-core MMA) and the staging of the exchanged state.
// Part of the LSTM op's CUDA code, included by lstm_cuda.cu only (one translation unit):
// its definitions live in an anonymous namespace.
#pragma once
#include "lstm/lstm_cuda_common.cuh"

namespace cnnlstm_ext::lstm {
namespace {

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

// Like stage_rows, from tagged words (lstm_cuda_math.cuh) instead of floats published behind a
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
// Shared by both persistent kernels.
// ---------------------------------------------------------------------------------------------
// Launch geometry shared by both persistent kernels (filled from a PersistentPlan).
struct PersistentGeometry {
  int T, B, H, D, HB, nblk, BC;
  int ldw, ldi;                              // row strides of w_s and in_s (elements)
  int off_in, off_pre, off_state, off_part;  // shared-memory byte offsets (off_pre: forward only)
};

// What one (b, u) pair reads from global memory at one step, loaded ahead of the barrier.
struct StepInput {
  float v[8];
};

}  // namespace
}  // namespace cnnlstm_ext::lstm
