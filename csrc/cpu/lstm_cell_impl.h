// Body of the LSTM cell kernels declared in lstm_cell.h. Included once per instruction set by a
// translation unit that first defines CNNLSTM_CELL_NS (the namespace of that variant) and, for a
// vector variant, the ATen CPU_CAPABILITY macros, so at::vec::Vectorized is that set's vector.
#include <ATen/cpu/vec/vec.h>

#include <cmath>

#include "lstm_cell.h"

namespace cnnlstm_ext {
namespace CNNLSTM_CELL_NS {
namespace {

using at::vec::Vectorized;

template <typename acc_t>
inline Vectorized<acc_t> vsigmoid(Vectorized<acc_t> v) {
  const Vectorized<acc_t> one(acc_t(1));
  return one / (one + v.neg().exp());
}

// tanh(v) = 2 / (1 + exp(-2v)) - 1: one exp, where Sleef's tanh took most of the cell update's
// time. Its error is absolute, about the rounding of 1 (1e-7 in float32), which is what reaches
// h and c; the relative error grows only where tanh(v) is near 0.
template <typename acc_t>
inline Vectorized<acc_t> vtanh(Vectorized<acc_t> v) {
  const Vectorized<acc_t> one(acc_t(1)), two(acc_t(2)), minus_two(acc_t(-2));
  return two / (one + (v * minus_two).exp()) - one;
}

template <typename acc_t>
inline acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + std::exp(-v));
}

template <typename acc_t>
void forward_row(const acc_t* x_row, const acc_t* r_row, acc_t* c_row, acc_t* h_row, acc_t* y_row,
                 acc_t* g_row, acc_t* cl_row, int64_t n, int64_t H) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    Vec i = vsigmoid(Vec::loadu(x_row + j) + Vec::loadu(r_row + j));
    Vec f = vsigmoid(Vec::loadu(x_row + H + j) + Vec::loadu(r_row + H + j));
    Vec g = vtanh(Vec::loadu(x_row + 2 * H + j) + Vec::loadu(r_row + 2 * H + j));
    Vec o = vsigmoid(Vec::loadu(x_row + 3 * H + j) + Vec::loadu(r_row + 3 * H + j));
    Vec cn = f * Vec::loadu(c_row + j) + i * g;
    Vec hn = o * vtanh(cn);
    cn.store(c_row + j);
    hn.store(h_row + j);
    hn.store(y_row + j);
    if (g_row) {
      i.store(g_row + j);
      f.store(g_row + H + j);
      g.store(g_row + 2 * H + j);
      o.store(g_row + 3 * H + j);
      cn.store(cl_row + j);
    }
  }
  for (; j < n; ++j) {
    const acc_t i = sigmoid(x_row[j] + r_row[j]);
    const acc_t f = sigmoid(x_row[H + j] + r_row[H + j]);
    const acc_t g = std::tanh(x_row[2 * H + j] + r_row[2 * H + j]);
    const acc_t o = sigmoid(x_row[3 * H + j] + r_row[3 * H + j]);
    const acc_t cn = f * c_row[j] + i * g;
    const acc_t hn = o * std::tanh(cn);
    c_row[j] = cn;
    h_row[j] = hn;
    y_row[j] = hn;
    if (g_row) {
      g_row[j] = i;
      g_row[H + j] = f;
      g_row[2 * H + j] = g;
      g_row[3 * H + j] = o;
      cl_row[j] = cn;
    }
  }
}

template <typename acc_t>
void backward_row(const acc_t* g_row, const acc_t* c_row, const acc_t* cprev_row,
                  const acc_t* gy_row, const acc_t* dh_in, acc_t* dc_row, acc_t* ds_row,
                  acc_t* dG_row, int64_t n, int64_t H) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec one(acc_t(1));
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const Vec i = Vec::loadu(g_row + j), f = Vec::loadu(g_row + H + j);
    const Vec g = Vec::loadu(g_row + 2 * H + j), o = Vec::loadu(g_row + 3 * H + j);
    const Vec tc = vtanh(Vec::loadu(c_row + j));
    const Vec dh = Vec::loadu(gy_row + j) + Vec::loadu(dh_in + j);
    const Vec dc = Vec::loadu(dc_row + j) + dh * o * (one - tc * tc);
    const Vec di = dc * g * i * (one - i);
    const Vec df = dc * Vec::loadu(cprev_row + j) * f * (one - f);
    const Vec dg = dc * i * (one - g * g);
    const Vec dout = dh * tc * o * (one - o);
    (dc * f).store(dc_row + j);
    di.store(ds_row + j);
    df.store(ds_row + H + j);
    dg.store(ds_row + 2 * H + j);
    dout.store(ds_row + 3 * H + j);
    di.store(dG_row + j);
    df.store(dG_row + H + j);
    dg.store(dG_row + 2 * H + j);
    dout.store(dG_row + 3 * H + j);
  }
  for (; j < n; ++j) {
    const acc_t i = g_row[j], f = g_row[H + j], g = g_row[2 * H + j], o = g_row[3 * H + j];
    const acc_t tc = std::tanh(c_row[j]);
    const acc_t dh = gy_row[j] + dh_in[j];
    const acc_t dc = dc_row[j] + dh * o * (acc_t(1) - tc * tc);
    const acc_t di = dc * g * i * (acc_t(1) - i);
    const acc_t df = dc * cprev_row[j] * f * (acc_t(1) - f);
    const acc_t dg = dc * i * (acc_t(1) - g * g);
    const acc_t dout = dh * tc * o * (acc_t(1) - o);
    dc_row[j] = dc * f;
    ds_row[j] = dG_row[j] = di;
    ds_row[H + j] = dG_row[H + j] = df;
    ds_row[2 * H + j] = dG_row[2 * H + j] = dg;
    ds_row[3 * H + j] = dG_row[3 * H + j] = dout;
  }
}

#ifdef CPU_CAPABILITY_AVX2
// AVX2/FMA recurrent product (lstm_cell.h). MKL runs these small-M GEMMs ([8, 512] x [512, 2048]
// per direction and step) at about half of the FMA rate. Here output columns go in blocks of 16,
// rows in groups of 4: 8 accumulators, and per j two loads of w and four broadcasts of a. The
// block's w (128 KiB at J = 2048) stays in L2 for the next row group.
// (No std:: templates below: an instantiation compiled for AVX2 here could be the one the linker
// keeps for the baseline translation units too.)
void recurrent_product_avx2(const float* a, const float* w, float* out, int64_t B, int64_t J,
                            int64_t C, int64_t c0, int64_t c1, const float* zeros) {
  constexpr int64_t kRows = 4;
  for (int64_t n0 = c0; n0 < c1; n0 += kRecColumns) {
    for (int64_t r0 = 0; r0 < B; r0 += kRows) {
      const int64_t nr = B - r0 < kRows ? B - r0 : kRows;
      const float* ar[kRows];
      for (int64_t r = 0; r < kRows; ++r) ar[r] = r < nr ? a + (r0 + r) * J : zeros;
      __m256 lo[kRows], hi[kRows];
      for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
      const float* wc = w + n0 * J;  // block n0 / 16 of the packed [C / 16, J, 16]
      for (int64_t j = 0; j < J; ++j) {
        const __m256 w0 = _mm256_loadu_ps(wc + j * kRecColumns);
        const __m256 w1 = _mm256_loadu_ps(wc + j * kRecColumns + 8);
        for (int r = 0; r < kRows; ++r) {
          const __m256 av = _mm256_broadcast_ss(ar[r] + j);
          lo[r] = _mm256_fmadd_ps(av, w0, lo[r]);
          hi[r] = _mm256_fmadd_ps(av, w1, hi[r]);
        }
      }
      for (int r = 0; r < kRows; ++r) {  // r constant after unrolling: lo/hi stay in registers
        if (r >= nr) break;
        _mm256_storeu_ps(out + (r0 + r) * C + n0, lo[r]);
        _mm256_storeu_ps(out + (r0 + r) * C + n0 + 8, hi[r]);
      }
    }
  }
}
#endif  // CPU_CAPABILITY_AVX2

}  // namespace

#ifdef CPU_CAPABILITY_AVX2
LstmCellKernels<float> kernels_float() {
  return {&forward_row<float>, &backward_row<float>, &recurrent_product_avx2};
}
#else
LstmCellKernels<float> kernels_float() { return {&forward_row<float>, &backward_row<float>}; }
#endif
LstmCellKernels<double> kernels_double() { return {&forward_row<double>, &backward_row<double>}; }

}  // namespace CNNLSTM_CELL_NS
}  // namespace cnnlstm_ext
