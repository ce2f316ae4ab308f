// Device math shared by the LSTM kernels: gate activations, dtype conversion, and the
// per-direction grid barrier used by the persistent recurrence.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace cnnlstm_ext::lstm {

// Four consecutive elements (16- or 8-byte aligned) widened to float.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 f = *reinterpret_cast<const float4*>(p);
  v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
}
__device__ __forceinline__ void load4(const c10::BFloat16* p, float (&v)[4]) {
  // bfloat16 is the upper half of a float32: widening is a shift.
  const uint2 r = *reinterpret_cast<const uint2*>(p);
  v[0] = __uint_as_float(r.x << 16); v[1] = __uint_as_float(r.x & 0xffff0000u);
  v[2] = __uint_as_float(r.y << 16); v[3] = __uint_as_float(r.y & 0xffff0000u);
}
__device__ __forceinline__ void load4(const c10::Half* p, float (&v)[4]) {
  const uint2 r = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&r.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&r.y));
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_(acc_t x) { return acc_t(1) / (acc_t(1) + exp(-x)); }
template <>
__device__ __forceinline__ float sigmoid_<float>(float x) { return 1.f / (1.f + expf(-x)); }

template <typename acc_t>
__device__ __forceinline__ acc_t tanh_(acc_t x) { return tanh(x); }
template <>
__device__ __forceinline__ float tanh_<float>(float x) { return tanhf(x); }

// Time index of step s for a sequence of length len: forward direction walks 0..len-1,
// reverse direction len-1..0.
__device__ __forceinline__ int time_index(int dir, int s, int len) { return dir == 0 ? s : len - 1 - s; }

// Lengths are range-checked on the host where possible; clamping here keeps a bad device-side
// value from ever indexing out of bounds.
__device__ __forceinline__ int seq_length(const int64_t* lengths, int b, int T) {
  if (lengths == nullptr) return T;
  long long L = lengths[b];
  return L < 1 ? 1 : (L > T ? T : static_cast<int>(L));
}

// Barrier over the CTAs of one direction, split in two halves so that a CTA can issue the
// loads of its next step between them. Every CTA arrives once per step (adds 1 to `counter`,
// with release semantics, after all its threads' writes of the step) and then waits until all
// `expected` arrivals are in (acquire). The counter only grows (zeroed before the launch), so no
// reset is needed between steps.
__device__ __forceinline__ void barrier_arrive(unsigned int* counter) {
  __syncthreads();  // all writes of this CTA happen before thread 0's release
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
  }
}

__device__ __forceinline__ void barrier_wait(unsigned int* counter, unsigned int expected) {
  if (threadIdx.x == 0) {
    const long long start = clock64();
    unsigned int seen;
    while (true) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
      if (seen >= expected) break;
      // Co-residency is guaranteed by the cooperative launch, so a wait this long (~30 s) is a
      // bug: fail the launch loudly instead of hanging the device.
      if (clock64() - start > (1ll << 36)) __trap();
    }
  }
  __syncthreads();  // thread 0's acquire happens before every thread's reads of the step
}

// Tagged exchange words: a float value and the step that wrote it, in one 64-bit word written
// and read with single 64-bit accesses (single-copy atomic), so a reader that sees the step also
// sees its value, with no fence and no barrier. Relaxed at GPU scope: the readers are other CTAs.
__device__ __forceinline__ unsigned long long tagged_word(float value, unsigned int step) {
  return (static_cast<unsigned long long>(step) << 32) | __float_as_uint(value);
}
__device__ __forceinline__ unsigned int word_step(unsigned long long w) {
  return static_cast<unsigned int>(w >> 32);
}
__device__ __forceinline__ float word_value(unsigned long long w) {
  return __uint_as_float(static_cast<unsigned int>(w));
}
__device__ __forceinline__ unsigned long long load_word(const unsigned long long* p) {
  unsigned long long w;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(w) : "l"(p) : "memory");
  return w;
}
__device__ __forceinline__ void store_word(unsigned long long* p, unsigned long long w) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}

}  // namespace cnnlstm_ext::lstm
