// Path choice, persistent launch plans and launch helpers (host side).
// Part of the LSTM op's CUDA code, included by lstm_cuda.cu only (one translation unit):
// its definitions live in an anonymous namespace.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "lstm/lstm.h"
#include "lstm/lstm_cuda_common.cuh"
#include "lstm/lstm_persistent_plan.h"
#include "options.h"

namespace cnnlstm_ext::lstm {
namespace {

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
int grid_for(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 8)));
}

// The options that steer the recurrence (csrc/options.h; cnnlstm_ext.backends.lstm):
//   path: auto takes the persistent path up to persistent_max_batch where a plan fits, else the
//     per-step one; persistent/stepwise force one (tests and benchmarks).
//   exchange: how the CTAs of the persistent forward pass h between steps. barrier (default):
//     float rows and a per-direction flag barrier. tagged: each element carries the step that
//     wrote it in a 64-bit word, and readers wait on the data itself (one L2 round trip per step
//     instead of two, no fence); FMA product only.
//   persistent_min_hb: the fewest hidden units per CTA a persistent plan may use (0: any). Larger
//     slices mean fewer CTAs per barrier and less staging traffic, but more product per CTA.
bool forced_persistent() { return options().lstm_path == LstmPath::kPersistent; }

// A plan (lstm_persistent_plan.h) with the kernels' geometry.
struct PersistentPlan : PersistentLayout {
  PersistentGeometry geometry(const LstmDims& d) const {
    return {static_cast<int>(d.T), static_cast<int>(d.B), static_cast<int>(d.H), static_cast<int>(d.D),
            HB, nblk, BC, ldw, ldi, off_in, off_pre, off_state, off_part};
  }
};

static_assert(kPersistentThreads == kThreads, "lstm_persistent_plan.h plans CTAs of kThreads");

// The current GPU's limits, as the planner takes them.
CardLimits current_card_limits() {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  CardLimits card;
  card.name = prop->name;
  card.sms = prop->multiProcessorCount;
  card.smem_per_block = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  card.smem_per_sm = static_cast<int64_t>(prop->sharedMemPerMultiprocessor);
  card.smem_reserved = static_cast<int64_t>(prop->reservedSharedMemPerBlock);
  card.max_threads_per_sm = prop->maxThreadsPerMultiProcessor;
  card.max_blocks_per_sm = prop->maxBlocksPerMultiProcessor;
  return card;
}

template <typename Kernel>
bool fits_coresident(Kernel kernel, size_t smem, int grid) {
  // (smem is within the card's opt-in limit: plan_persistent_layout checked it.)
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  return per_sm * prop->multiProcessorCount >= grid;
}

// Tensor cores for the recurrent product of 16-bit weights with backends.lstm.mma; the FMA
// product otherwise (always for 32-bit weights). Opt-in: on an H200 it passed every parity test
// but was faster than the FMA product only for bfloat16 inference at B >= 32
// (benchmarks/RESULTS.md).
template <typename scalar_t>
bool want_mma() {
  return sizeof(scalar_t) == 2 && options().lstm_mma;
}

// The plan for this GPU: lstm_persistent_plan.h's arithmetic, with the driver's occupancy
// answer (which also counts the kernel's registers) deciding co-residency.
template <typename scalar_t, typename KernelFor>
PersistentPlan plan_persistent_uncached(const LstmDims& d, bool forward, bool mma, int min_hb,
                                        KernelFor kernel_for) {
  auto fits = [&](int BT, bool use_mma, size_t smem, int grid) {
    return fits_coresident(kernel_for(BT, use_mma), smem, grid);
  };
  PersistentPlan plan;
  static_cast<PersistentLayout&>(plan) = plan_persistent_layout(
      d.B, d.H, d.D, forward, mma, static_cast<int64_t>(sizeof(scalar_t)), min_hb,
      current_card_limits(), fits);
  return plan;
}

// Plans are cached per device and shape: planning queries the driver (occupancy, attributes).
template <typename scalar_t, typename KernelFor>
PersistentPlan plan_persistent(const LstmDims& d, bool forward, KernelFor kernel_for) {
  using Key = std::tuple<int, bool, bool, int, int, int64_t, int64_t, int64_t>;
  static std::mutex mutex;
  static std::map<Key, PersistentPlan> cache;
  const bool mma = want_mma<scalar_t>();
  const int min_hb = static_cast<int>(std::min<int64_t>(options().persistent_min_hb, 1 << 20));
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
  const Options opt = options();
  TORCH_CHECK(dt != at::kDouble || opt.lstm_path != LstmPath::kPersistent,
              "cnnlstm_ext.backends.lstm.path is 'persistent', but the persistent kernel has no "
              "float64 version; set it to 'auto' (float64 takes the per-step path)");
  if (dt == at::kDouble) return false;
  switch (opt.lstm_path) {
    case LstmPath::kStepwise: return false;
    case LstmPath::kPersistent: return true;
    default: return d.B <= opt.persistent_max_batch;
  }
}

// A plan that cannot run falls back to the per-step path when the path was chosen automatically;
// a forced persistent path is an error that says why, never a silent fallback.
bool persistent_plan_usable(const PersistentPlan& plan, const char* op) {
  if (plan.ok) return true;
  TORCH_CHECK(!forced_persistent(), op, ": cnnlstm_ext.backends.lstm.path is 'persistent', but "
              "the persistent kernel cannot run this layer: ", plan.why_not,
              "; set it to 'auto' to let the per-step path take this shape");
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

}  // namespace
}  // namespace cnnlstm_ext::lstm
