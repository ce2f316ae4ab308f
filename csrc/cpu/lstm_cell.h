// Gate math of one LSTM step for one (sequence, direction) row, built twice: for the baseline
// instruction set (lstm_cell_default.cpp) and with AVX2/FMA (lstm_cell_avx2.cpp, x86-64 only),
// chosen at run time by lstm_cell_kernels() from ATen's CPU capability (which also honours
// ATEN_CPU_CAPABILITY=default).
#pragma once
#include <cstdint>

namespace cnnlstm_ext {

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

// The recurrent products of one step, for one direction, over a slice of the output columns:
//   forward:  out[b, n] = sum_k a[b, k] * w[n, k]  for n in [c0, c1)   (a: h_{s-1}, w: w_hh)
//   backward: out[b, k] = sum_n a[b, n] * w[n, k]  for k in [c0, c1)   (a: dG_s, w: w_hh)
// a: [B, *] and out: [B, *] row-major, w: [N, K] row-major (forward) or packed by blocks of
// kRecColumns columns, [K / kRecColumns, N, kRecColumns] (backward); scratch: rec_scratch(K, N) elements
// of the calling thread. The caller splits the columns over threads (slices of multiples of
// kRecColumns). Null where the variant has none (at::bmm then).
template <typename acc_t>
using RecurrentProductFn = void (*)(const acc_t* a, const acc_t* w, acc_t* out, int64_t B,
                                    int64_t N, int64_t K, int64_t c0, int64_t c1, acc_t* scratch);
inline int64_t rec_scratch(int64_t K, int64_t N) { return 8 * K > N ? 8 * K : N; }
constexpr int64_t kRecColumns = 16;

template <typename acc_t>
struct LstmCellKernels {
  LstmCellForwardFn<acc_t> forward;
  LstmCellBackwardFn<acc_t> backward;
  RecurrentProductFn<acc_t> rec_forward = nullptr;   // needs K % 8 == 0
  RecurrentProductFn<acc_t> rec_backward = nullptr;  // needs K % kRecColumns == 0
};

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define CNNLSTM_EXT_CELL_AVX2 1
#endif

namespace cell_default {
LstmCellKernels<float> kernels_float();
LstmCellKernels<double> kernels_double();
}  // namespace cell_default

#ifdef CNNLSTM_EXT_CELL_AVX2
namespace cell_avx2 {
LstmCellKernels<float> kernels_float();
LstmCellKernels<double> kernels_double();
}  // namespace cell_avx2
#endif

// The best variant this CPU runs (decided once).
template <typename acc_t>
LstmCellKernels<acc_t> lstm_cell_kernels();

}  // namespace cnnlstm_ext
