// Gate math of one LSTM step for one (sequence, direction) row, built twice: for the baseline
// instruction set (lstm_cpu_cell_default.cpp) and with AVX2/FMA (lstm_cpu_cell_avx2.cpp, x86-64 only);
// and the recurrent product, with AVX2/FMA and with AVX-512 (lstm_cpu_rec_avx512.cpp; for bfloat16
// inputs with AVX512-BF16 too). Chosen at run time by lstm_cell_kernels() from ATen's CPU
// capability (which also honours ATEN_CPU_CAPABILITY=default or avx2).
#pragma once
#include <cstdint>

#include "cpu_capability.h"

namespace cnnlstm_ext::lstm {

// Forward of one row, for n hidden units: gates pre-activations x_row + r_row (i, f, g, o, each
// H apart), c_row updated in place to c_t, h_t written to h_row and y_row; g_row (activated
// gates, H apart) and cl_row (c_t) are written when not null (training). Pointers are offset to
// the first unit; n = H for a whole row.
template <typename acc_t>
using LstmCellForwardFn = void (*)(const acc_t* x_row, const acc_t* r_row, acc_t* c_row,
                                   acc_t* h_row, acc_t* y_row, acc_t* g_row, acc_t* cl_row,
                                   int64_t n, int64_t H);

// Backward of one row, for n hidden units (pointers offset as in forward): from the saved gates
// g_row, c_t c_row, c_{t-1} cprev_row, the output gradient gy_row and the recurrent gradient
// dh_in, updates dc_row (dc_t in, dc_{t-1} out) and writes the pre-activation gate gradients
// (H apart) to ds_row and dG_row.
template <typename acc_t>
using LstmCellBackwardFn = void (*)(const acc_t* g_row, const acc_t* c_row, const acc_t* cprev_row,
                                    const acc_t* gy_row, const acc_t* dh_in, acc_t* dc_row,
                                    acc_t* ds_row, acc_t* dG_row, int64_t n, int64_t H);

// The recurrent product of one step, for one direction, over a slice of output columns:
//   out[b, c] = sum_j a[b, j] * w[j, c]  for c in [c0, c1)
// forward:  a = h_{s-1}: [B, H], w = w_hh^T (c: a gate column of 4H);
// backward: a = dG_s: [B, 4H], w = w_hh     (c: a hidden unit of H).
// a: [B, J] and out: [B, C] row-major; w packed by blocks of kRecColumns columns,
// [C / kRecColumns, J, kRecColumns] (pack_w_hh in lstm_cpu_recurrence.h), so that the block a tile
// reads streams through memory in order and every j is one vector load per block (the products
// broadcast a and keep a tile of rows x columns in registers). zeros: J zeros, the rows padding
// the last row group. c0 and c1 are multiples of kRecColumns; the caller splits the columns over
// threads. Null where the variant has none (at::bmm then).
template <typename acc_t>
using RecurrentProductFn = void (*)(const acc_t* a, const acc_t* w, acc_t* out, int64_t B,
                                    int64_t J, int64_t C, int64_t c0, int64_t c1,
                                    const acc_t* zeros);
constexpr int64_t kRecColumns = 16;

// The float32 forward product with the batch in the vector lanes (AVX-512; from kBtRows rows):
// aT = a^T: [J, ldb], ldb a multiple of kBtRows, rows past B zero (to_bt); w packed by groups of
// kBtColumns columns (pack_bt_group); out as above; c0 and c1 multiples of kBtColumns.
using RecurrentProductBtFn = void (*)(const float* aT, int64_t ldb, const float* w, float* out,
                                      int64_t B, int64_t J, int64_t C, int64_t c0, int64_t c1);
// a: [B, J] -> aT: [J, ldb], rows B .. ldb - 1 zero; J a multiple of 16.
using ToBtFn = void (*)(const float* a, int64_t B, int64_t J, float* aT, int64_t ldb);
// kBtColumns rows of w_hh (row stride J, a multiple of 16) -> their packed group [kBtColumns * J]:
// the group's tiles of columns one after the other, each [J, its columns].
using PackBtFn = void (*)(const float* w, int64_t J, float* packed);
constexpr int64_t kBtRows = 32;
constexpr int64_t kBtColumns = 64;
// ldb for a batch of B rows: B rounded up to a multiple of kBtRows.
constexpr int64_t bt_ldb(int64_t B) { return (B + kBtRows - 1) / kBtRows * kBtRows; }

// The forward recurrent product with bfloat16 operands (raw bits) and float32 sums, for bfloat16
// inputs: dot products of pairs along j (AVX512-BF16). a: [B, J] bfloat16; w packed by blocks of
// kRecColumns columns and pairs of j, [C / kRecColumns, J / 2, kRecColumns, 2] (pack_w_hh_bf16);
// J even; out, c0, c1 as above.
using RecurrentProductBf16Fn = void (*)(const uint16_t* a, const uint16_t* w, float* out,
                                        int64_t B, int64_t J, int64_t C, int64_t c0, int64_t c1);
// float32 -> bfloat16 bits, rounded to nearest even, n elements.
using ToBf16Fn = void (*)(const float* src, uint16_t* dst, int64_t n);
// The forward of one row (as LstmCellForwardFn) for bfloat16 layers with bfloat16 products:
// x_row (the projection), y_row, g_row and cl_row are bfloat16 bits, so that those [T, B, ...]
// tensors are never made in float32 and converted; the state (r_row, c_row, h_row) and all math
// stay float32. Rounds where the float32 kernel's caller rounded its outputs: same results.
using LstmCellForwardBf16Fn = void (*)(const uint16_t* x_row, const float* r_row, float* c_row,
                                       float* h_row, uint16_t* y_row, uint16_t* g_row,
                                       uint16_t* cl_row, int64_t n, int64_t H);
// The backward of one row (as LstmCellBackwardFn) for those layers: g_row, c_row, cprev_row,
// gy_row and dG_row are bfloat16 bits; the recurrent state (dh_in, dc_row, ds_row) is float32.
using LstmCellBackwardBf16Fn = void (*)(const uint16_t* g_row, const uint16_t* c_row,
                                        const uint16_t* cprev_row, const uint16_t* gy_row,
                                        const float* dh_in, float* dc_row, float* ds_row,
                                        uint16_t* dG_row, int64_t n, int64_t H);

// The packing of w_hh's blocks (pack_w_hh, pack_w_hh_bf16 in lstm_cpu_recurrence.h): 16 rows of 32-bit
// words [16, cols] (row stride ld) -> [cols, 16]; cols a multiple of 8.
using Transpose16Fn = void (*)(const uint32_t* src, int64_t ld, uint32_t* dst, int64_t cols);

template <typename acc_t>
struct LstmCellKernels {
  LstmCellForwardFn<acc_t> forward;
  LstmCellBackwardFn<acc_t> backward;
  RecurrentProductFn<acc_t> recurrent_product = nullptr;
  // Where the CPU has AVX512-BF16 (float32 variants only): the product of bfloat16 inputs.
  RecurrentProductBf16Fn recurrent_product_bf16 = nullptr;
  // Where the CPU has AMX-BF16: the same product on AMX tiles, for batches of at least
  // kAmxMinRows and J a multiple of kAmxColumnsJ (faster from 4 rows, 5x at 32).
  RecurrentProductBf16Fn recurrent_product_bf16_amx = nullptr;
  // Where the CPU has AVX-512 (float32 variants only): the product with the batch in the lanes.
  RecurrentProductBtFn recurrent_product_bt = nullptr;
  ToBtFn to_bt = nullptr;
  PackBtFn pack_bt_group = nullptr;
  ToBf16Fn to_bf16 = nullptr;
  LstmCellForwardBf16Fn forward_bf16 = nullptr;
  LstmCellBackwardBf16Fn backward_bf16 = nullptr;
  Transpose16Fn transpose16 = nullptr;
  // Instruction sets of the variant's cell update and recurrent product ("bmm" where it has no
  // product kernel), for the kernel trace (kernel_trace.h).
  const char* cell_isa = "default";
  const char* product_isa = "bmm";
};

namespace isa_default {
LstmCellKernels<float> kernels_float();
LstmCellKernels<double> kernels_double();
}  // namespace isa_default

#ifdef CNNLSTM_EXT_X86_SIMD
namespace isa_avx2 {
LstmCellKernels<float> kernels_float();
LstmCellKernels<double> kernels_double();
}  // namespace isa_avx2
namespace isa_avx512 {
// The cell updates built for AVX-512 (lstm_cpu_cell_avx512.cpp): forward, backward and their
// bfloat16-io forms; no product or packing (those come from below and from the AVX2 build).
LstmCellKernels<float> kernels_float();
void recurrent_product(const float* a, const float* w, float* out, int64_t B, int64_t J,
                       int64_t C, int64_t c0, int64_t c1, const float* zeros);
void recurrent_product_bf16(const uint16_t* a, const uint16_t* w, float* out, int64_t B,
                            int64_t J, int64_t C, int64_t c0, int64_t c1);
void to_bf16(const float* src, uint16_t* dst, int64_t n);
void recurrent_product_bt(const float* aT, int64_t ldb, const float* w, float* out, int64_t B,
                          int64_t J, int64_t C, int64_t c0, int64_t c1);
void to_bt(const float* a, int64_t B, int64_t J, float* aT, int64_t ldb);
void pack_bt_group(const float* w, int64_t J, float* packed);
}  // namespace isa_avx512
namespace isa_amx {
// lstm_cpu_rec_amx.cpp: J, c0 and c1 multiples of 32.
void recurrent_product_bf16(const uint16_t* a, const uint16_t* w, float* out, int64_t B,
                            int64_t J, int64_t C, int64_t c0, int64_t c1);
}  // namespace isa_amx
#endif
constexpr int64_t kAmxMinRows = 4;
constexpr int64_t kAmxColumnsJ = 32;

// The best variant this CPU runs (decided once).
template <typename acc_t>
LstmCellKernels<acc_t> lstm_cell_kernels();

}  // namespace cnnlstm_ext::lstm
