// The persistent LSTM kernel's launch plan (csrc/lstm/lstm_persistent_plan.h) with the limits of
// the cards the CUDA build targets (sm_80, sm_86, sm_89, sm_90), on the CPU: every plan fits the
// card's shared memory per block and runs co-resident, and a layer no slice fits gets no plan
// (the automatic path then takes the per-step kernels; a forced persistent path says why).
#include "lstm/lstm_persistent_plan.h"

#include <cstdio>
#include <string>
#include <vector>

using cnnlstm_ext::lstm::blocks_per_sm;
using cnnlstm_ext::lstm::CardLimits;
using cnnlstm_ext::lstm::PersistentLayout;
using cnnlstm_ext::lstm::plan_persistent_layout;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

// cudaDeviceProp of each card (CUDA C++ Programming Guide, compute capability tables): SMs,
// opt-in shared memory per block, shared memory per SM, reserved per block, threads and CTAs per
// SM.
const std::vector<CardLimits>& cards() {
  static const std::vector<CardLimits> all = {
      {"A100 (sm_80)", 108, 166912, 167936, 1024, 2048, 32},
      {"A10 (sm_86)", 72, 101376, 102400, 1024, 1536, 16},
      {"RTX 3090 (sm_86)", 82, 101376, 102400, 1024, 1536, 16},
      {"RTX 4090 (sm_89)", 128, 101376, 102400, 1024, 1536, 24},
      {"L4 (sm_89)", 58, 101376, 102400, 1024, 1536, 24},
      {"H100 (sm_90, SXM)", 132, 232448, 233472, 1024, 2048, 32},
  };
  return all;
}

const CardLimits& card(const std::string& prefix) {
  for (const auto& c : cards()) {
    if (c.name.rfind(prefix + " (", 0) == 0) return c;
  }
  std::printf("no card %s\n", prefix.c_str());
  std::exit(2);
}

// The device planner's question, answered from the card's limits.
PersistentLayout plan(const CardLimits& c, int64_t B, int64_t H, int64_t D, bool forward,
                      int64_t elem, bool mma, int min_hb = 0) {
  auto fits = [&](int, bool, size_t smem, int grid) {
    return static_cast<int64_t>(blocks_per_sm(c, static_cast<int64_t>(smem))) * c.sms >= grid;
  };
  return plan_persistent_layout(B, H, D, forward, mma, elem, min_hb, c, fits);
}

std::string describe(const CardLimits& c, int64_t B, int64_t H, int64_t D, bool forward,
                     int64_t elem, bool mma) {
  return c.name + " B=" + std::to_string(B) + " H=" + std::to_string(H) + " D=" +
         std::to_string(D) + (forward ? " forward" : " backward") + " elem=" +
         std::to_string(elem) + (mma ? " mma" : " fma");
}

// Every plan of a sweep of layer shapes fits its card: shared memory per block, co-residency of
// the whole grid, the layout's regions inside the block's shared memory, a slice that divides H.
void test_every_plan_fits_its_card() {
  int planned = 0, refused = 0;
  for (const auto& c : cards()) {
    for (int64_t H : {32, 64, 96, 128, 256, 384, 512, 768, 1024, 2048}) {
      for (int64_t B : {1, 2, 5, 8, 16, 32, 64, 256}) {
        for (int64_t D : {1, 2}) {
          for (bool forward : {true, false}) {
            for (auto [elem, mma] : {std::pair<int64_t, bool>{4, false}, {2, false}, {2, true}}) {
              const auto p = plan(c, B, H, D, forward, elem, mma);
              const std::string what = describe(c, B, H, D, forward, elem, mma);
              if (!p.ok) {
                ++refused;
                expect(!p.why_not.empty(), what + ": a refused plan says why");
                continue;
              }
              ++planned;
              expect(p.smem <= static_cast<size_t>(c.smem_per_block),
                     what + ": " + std::to_string(p.smem) + " bytes exceed the block's " +
                         std::to_string(c.smem_per_block));
              const int per_sm = blocks_per_sm(c, static_cast<int64_t>(p.smem));
              expect(static_cast<int64_t>(per_sm) * c.sms >= D * p.nblk,
                     what + ": grid of " + std::to_string(D * p.nblk) + " CTAs not co-resident");
              expect(H % p.HB == 0 && p.nblk * p.HB == H, what + ": slice does not divide H");
              expect(p.BT > 0 && p.BC % p.BT == 0 && p.BC >= p.BT, what + ": staging chunk");
              expect(0 < p.off_in && p.off_in <= p.off_pre && p.off_pre <= p.off_state &&
                         p.off_state < p.off_part && static_cast<size_t>(p.off_part) <= p.smem,
                     what + ": layout regions out of order or outside the block");
              expect(p.mma == mma, what + ": product kind");
            }
          }
        }
      }
    }
  }
  expect(planned > 0 && refused > 0, "the sweep has plans and refusals");
  std::printf("sweep: %d plans, %d refusals\n", planned, refused);
}

// A card with at least the SMs and shared memory of another plans every layer the other does.
void test_larger_cards_plan_what_smaller_ones_do() {
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"L4", "RTX 4090"}, {"A10", "RTX 3090"}, {"RTX 3090", "RTX 4090"}, {"A10", "A100"},
      {"RTX 4090", "H100"}, {"A100", "H100"}};
  for (const auto& [small, large] : pairs) {
    for (int64_t H : {64, 128, 256, 512, 1024}) {
      for (int64_t B : {1, 4, 16, 32}) {
        for (bool forward : {true, false}) {
          if (plan(card(small), B, H, 2, forward, 4, false).ok) {
            expect(plan(card(large), B, H, 2, forward, 4, false).ok,
                   describe(card(large), B, H, 2, forward, 4, false) + " lost the plan of " + small);
          }
        }
      }
    }
  }
}

// The default model's LSTM layer (H = 512, two directions, float32) at the training batch 32,
// forward: the smallest slice (4 units, 256 CTAs) needs 99 KiB per CTA (w_s 32 KiB, h chunk
// 64 KiB, product 2 KiB, state 1 KiB). Only an H100 holds two such CTAs per SM (264 >= 256); the
// other cards hold one (108, 128, 58, 72 < 256) and no larger slice fits their shared memory,
// so they take the per-step path.
void test_default_layer() {
  const auto h100 = plan(card("H100"), 32, 512, 2, true, 4, false);
  expect(h100.ok && h100.HB == 4 && h100.nblk == 128 && h100.BC == 32 && h100.smem == 101376,
         "H100: the default layer's forward plan (HB 4, 101376 bytes), got HB " +
             std::to_string(h100.HB) + ", " + std::to_string(h100.smem) + " bytes");
  for (const char* name : {"A100", "A10", "RTX 3090", "RTX 4090", "L4"}) {
    const auto p = plan(card(name), 32, 512, 2, true, 4, false);
    expect(!p.ok, std::string(name) + ": the default layer's forward must fall back");
    const std::string sms = std::to_string(card(name).sms) + " SMs, " +
                            std::to_string(card(name).smem_per_block) + " bytes";
    expect(p.why_not.find(sms) != std::string::npos,
           std::string(name) + ": why_not names the card's limits, got: " + p.why_not);
  }
  // At batch 4 the h chunk shrinks to 8 KiB: 40 KiB per CTA of 4 units. Two per SM on the 99 KiB
  // cards reach 256 CTAs only with 128 SMs (RTX 4090); A100 holds three per SM.
  for (const char* name : {"H100", "A100", "RTX 4090"}) {
    const auto p = plan(card(name), 4, 512, 2, true, 4, false);
    expect(p.ok && p.HB == 4 && p.smem == 41344, std::string(name) + ": default layer at B=4");
  }
  for (const char* name : {"A10", "RTX 3090", "L4"}) {
    expect(!plan(card(name), 4, 512, 2, true, 4, false).ok,
           std::string(name) + ": default layer at B=4 must fall back");
  }
}

// The built-in CPU model's size (H = 64, two directions) plans everywhere, both directions of
// the recurrence, both products.
void test_small_layer_everywhere() {
  for (const auto& c : cards()) {
    for (bool forward : {true, false}) {
      expect(plan(c, 8, 64, 2, forward, 4, false).ok, describe(c, 8, 64, 2, forward, 4, false));
      expect(plan(c, 8, 64, 2, forward, 2, true).ok, describe(c, 8, 64, 2, forward, 2, true));
    }
  }
}

// persistent_min_hb is honoured; what the kernels cannot take is refused before any sizing.
void test_limits_and_refusals() {
  const auto& h100 = card("H100");
  const auto p = plan(h100, 8, 256, 2, true, 4, false, /*min_hb=*/16);
  expect(p.ok && p.HB >= 16, "min_hb=16 gives a slice of at least 16 units");
  expect(plan(h100, 8, 100, 2, true, 4, false).why_not.find("multiple of 32") != std::string::npos,
         "H = 100 is refused");
  expect(plan(h100, 2048, 64, 2, true, 4, false).why_not.find("exceeds 1024") != std::string::npos,
         "B = 2048 is refused");
  // A block larger than the opt-in limit is never planned, even if the occupancy answer says yes.
  auto always = [](int, bool, size_t, int) { return true; };
  const auto big = plan_persistent_layout(32, 2048, 2, false, false, 4, 0, card("L4"), always);
  expect(!big.ok || big.smem <= static_cast<size_t>(card("L4").smem_per_block),
         "the opt-in limit bounds every plan");
}

}  // namespace

int main() {
  test_every_plan_fits_its_card();
  test_larger_cards_plan_what_smaller_ones_do();
  test_default_layer();
  test_small_layer_everywhere();
  test_limits_and_refusals();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all persistent plan checks passed\n");
  return 0;
}
