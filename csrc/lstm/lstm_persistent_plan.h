// The persistent recurrence's launch plan as size arithmetic over a card's limits. Host-only C++
// (no CUDA headers): lstm_cuda_plan.cuh plans with the current GPU's limits and the driver's
// occupancy answer, and cpp_tests/test_persistent_plan.cpp plans with the limits of the cards the
// build targets (sm_80, sm_86, sm_89, sm_90), which no test machine has all of.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>

namespace cnnlstm_ext::lstm {

constexpr int kPersistentThreads = 256;  // threads per CTA (kThreads of lstm_cuda_common.cuh)

// What a card offers a persistent grid (cudaDeviceProp's fields of the same meaning).
struct CardLimits {
  std::string name;
  int sms = 0;                  // multiProcessorCount
  int64_t smem_per_block = 0;   // sharedMemPerBlockOptin (dynamic shared memory, opted in)
  int64_t smem_per_sm = 0;      // sharedMemPerMultiprocessor
  int64_t smem_reserved = 0;    // reservedSharedMemPerBlock (the driver's 1 KiB from sm_80 on)
  int max_threads_per_sm = 0;   // maxThreadsPerMultiProcessor
  int max_blocks_per_sm = 0;    // maxBlocksPerMultiProcessor
};

// CTAs of `smem` bytes (and kPersistentThreads threads) that fit on one SM at once by shared
// memory, threads and the CTA limit. Registers are not counted: the device planner asks the
// driver (cudaOccupancyMaxActiveBlocksPerMultiprocessor), which counts them too.
inline int blocks_per_sm(const CardLimits& card, int64_t smem) {
  if (smem > card.smem_per_block) return 0;
  const int64_t by_smem = card.smem_per_sm / (smem + card.smem_reserved);
  const int64_t by_threads = card.max_threads_per_sm / kPersistentThreads;
  return static_cast<int>(std::min<int64_t>({by_smem, by_threads, card.max_blocks_per_sm}));
}

inline int64_t plan_round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Launch geometry of a persistent recurrence; ok=false when it cannot run co-resident, and then
// why_not says why (the error of a forced persistent path; the automatic path takes the per-step
// kernels instead).
struct PersistentLayout {
  bool ok = false;
  std::string why_not;
  bool mma = false;
  int HB = 0, nblk = 0, BC = 0, BT = 0, ldw = 0, ldi = 0;
  int off_in = 0, off_pre = 0, off_state = 0, off_part = 0;
  size_t smem = 0;
};

// Shared memory, in order: w_s (own rows of w_hh, or own columns in backward), the staged chunk
// of the exchanged matrix (h_{s-1}: [BC, H] forward, dG_{s+1}: [BC, 4H] backward), the forward's
// recurrent product [B, 4HB], the own state slices [2, B, HB], and the MMA partial sums.
// The smallest HB (most CTAs) whose grid of D * H/HB CTAs can be co-resident wins.
// B, H, D: the layer's batch, hidden size and directions; elem: bytes per weight element (4 or
// 2); mma: the tensor-core product (16-bit weights); fits(BT, mma, smem, grid): whether `grid`
// CTAs of that kernel instantiation and `smem` bytes are co-resident on the card.
template <typename Fits>
PersistentLayout plan_persistent_layout(int64_t B, int64_t H, int64_t D, bool forward, bool mma,
                                        int64_t elem, int min_hb, const CardLimits& card,
                                        Fits fits) {
  PersistentLayout plan;
  if (H % 32 != 0) {
    plan.why_not = "the hidden size " + std::to_string(H) + " is not a multiple of 32";
    return plan;
  }
  if (B > 1024) {
    plan.why_not = "the batch " + std::to_string(B) + " exceeds 1024";
    return plan;
  }
  const int BT = mma ? 8 : (B == 1 ? 1 : 4);          // batch rows per tile
  const int64_t K = forward ? H : 4 * H;              // reduction length of the product
  const int64_t in_elem = mma ? elem : 4;
  const int64_t pad = mma ? 8 : 0;                    // row padding (elements) for the MMA loads
  for (int HB : {4, 8, 16, 32, 64}) {
    if (H % HB != 0 || HB < min_hb) continue;
    const int nblk = static_cast<int>(H / HB);
    const int grid = static_cast<int>(D) * nblk;
    const int64_t O = forward ? 4 * HB : HB;
    const int64_t Opad = mma ? plan_round_up(O, 16) : O;
    // Stage up to 96 KiB of the exchanged matrix at a time.
    int64_t BC = std::max<int64_t>(BT, (98304 / ((K + pad) * in_elem)) / BT * BT);
    BC = std::min<int64_t>(BC, plan_round_up(B, BT));
    const int64_t w_bytes = plan_round_up(Opad * (K + pad) * elem, 16);
    const int64_t in_bytes = plan_round_up(BC * (K + pad) * in_elem, 16);
    const int64_t pre_bytes = forward ? plan_round_up(B * O * 4, 16) : 0;
    const int64_t state_bytes = plan_round_up(2 * B * HB * 4, 16);
    const int64_t part_bytes = mma ? 4 * std::max<int64_t>(1024, BC * Opad) : 0;
    const int64_t smem = w_bytes + in_bytes + pre_bytes + state_bytes + part_bytes;
    // More than a block may opt in to: this slice cannot run at all (larger ones need more).
    if (smem > card.smem_per_block || !fits(BT, mma, static_cast<size_t>(smem), grid)) continue;
    plan.ok = true;
    plan.mma = mma;
    plan.HB = HB;
    plan.nblk = nblk;
    plan.BC = static_cast<int>(BC);
    plan.BT = BT;
    plan.ldw = static_cast<int>(K + pad);
    plan.ldi = static_cast<int>(K + pad);
    plan.off_in = static_cast<int>(w_bytes);
    plan.off_pre = static_cast<int>(w_bytes + in_bytes);
    plan.off_state = static_cast<int>(w_bytes + in_bytes + pre_bytes);
    plan.off_part = static_cast<int>(w_bytes + in_bytes + pre_bytes + state_bytes);
    plan.smem = static_cast<size_t>(smem);
    return plan;
  }
  plan.why_not = std::string("no slice of hidden units (4 to 64 units per block, at least ") +
                 std::to_string(min_hb) + ") fits " + std::to_string(D) + " x H/slice blocks of " +
                 (mma ? "the tensor-core" : "the FMA") + " kernel co-resident on this GPU (" +
                 std::to_string(card.sms) + " SMs, " + std::to_string(card.smem_per_block) +
                 " bytes of shared memory per block)";
  return plan;
}

}  // namespace cnnlstm_ext::lstm
