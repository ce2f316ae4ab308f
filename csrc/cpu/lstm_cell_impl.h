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
    Vec g = (Vec::loadu(x_row + 2 * H + j) + Vec::loadu(r_row + 2 * H + j)).tanh();
    Vec o = vsigmoid(Vec::loadu(x_row + 3 * H + j) + Vec::loadu(r_row + 3 * H + j));
    Vec cn = f * Vec::loadu(c_row + j) + i * g;
    Vec hn = o * cn.tanh();
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
    const Vec tc = Vec::loadu(c_row + j).tanh();
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
// AVX2/FMA recurrent products (lstm_cell.h). MKL runs these small-M GEMMs ([8, 512] x [512, 2048]
// per direction and step) at about half of the FMA rate; these keep every FMA unit busy with
// independent accumulators and reuse each loaded w vector for several rows.

// Eight 8-lane vectors -> one vector of their eight horizontal sums.
inline __m256 hsum8(const __m256* v) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u, t, 0x20), _mm256_permute2f128_ps(u, t, 0x31));
}

// Forward: rows in groups of 8 (a partial group copied, zero-padded, into scratch), output columns
// n in blocks of 32 (their w rows, 64 KiB at K = 512, stay in L2 across the row groups). Each n
// is one dot product per row: 8 accumulators share every load of w[n, k:k+8].
// (No std:: templates below: an instantiation compiled for AVX2 here could be the one the linker
// keeps for the baseline translation units too.)
void rec_forward_avx2(const float* a, const float* w, float* out, int64_t B, int64_t N, int64_t K,
                      int64_t c0, int64_t c1, float* scratch) {
  constexpr int64_t kRows = 8, kBlock = 32;
  for (int64_t r0 = 0; r0 < B; r0 += kRows) {
    const int64_t nr = B - r0 < kRows ? B - r0 : kRows;
    const float* ap = a + r0 * K;  // a full group is read in place
    if (nr < kRows) {
      for (int64_t i = 0; i < kRows * K; ++i) scratch[i] = i < nr * K ? ap[i] : 0.f;
      ap = scratch;
    }
    for (int64_t nb = c0; nb < c1; nb += kBlock) {
      const int64_t ne = c1 < nb + kBlock ? c1 : nb + kBlock;
      for (int64_t n = nb; n < ne; ++n) {
        const float* wr = w + n * K;
        __m256 acc[kRows];
        for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) {
          const __m256 wv = _mm256_loadu_ps(wr + k);
          for (int r = 0; r < kRows; ++r)
            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(ap + r * K + k), wv, acc[r]);
        }
        alignas(32) float sums[kRows];
        _mm256_store_ps(sums, hsum8(acc));
        for (int64_t r = 0; r < nr; ++r) out[(r0 + r) * N + n] = sums[r];
      }
    }
  }
}

// Backward: output columns k in blocks of 16, rows in groups of 4: 8 accumulators, and per n two
// loads of w and four broadcasts of a. w comes packed by column block, [K / 16, N, 16], so each
// block streams through memory in order (its 128 KiB at N = 2048 stay in L2 for the next row
// group); read in place, its rows would be 4H apart and defeat the prefetchers. scratch: N zeros
// (the rows that pad the last group).
void rec_backward_avx2(const float* a, const float* w, float* out, int64_t B, int64_t N, int64_t K,
                       int64_t c0, int64_t c1, float* scratch) {
  constexpr int64_t kRows = 4;
  for (int64_t i = 0; i < N; ++i) scratch[i] = 0.f;
  for (int64_t k0 = c0; k0 < c1; k0 += kRecColumns) {
    for (int64_t r0 = 0; r0 < B; r0 += kRows) {
      const int64_t nr = B - r0 < kRows ? B - r0 : kRows;
      const float* ar[kRows];
      for (int64_t r = 0; r < kRows; ++r) ar[r] = r < nr ? a + (r0 + r) * N : scratch;
      __m256 lo[kRows], hi[kRows];
      for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
      const float* wc = w + k0 * N;  // block k0 / 16 of the packed [K / 16, N, 16]
      for (int64_t n = 0; n < N; ++n) {
        const __m256 w0 = _mm256_loadu_ps(wc + n * kRecColumns);
        const __m256 w1 = _mm256_loadu_ps(wc + n * kRecColumns + 8);
        for (int r = 0; r < kRows; ++r) {
          const __m256 av = _mm256_broadcast_ss(ar[r] + n);
          lo[r] = _mm256_fmadd_ps(av, w0, lo[r]);
          hi[r] = _mm256_fmadd_ps(av, w1, hi[r]);
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        _mm256_storeu_ps(out + (r0 + r) * K + k0, lo[r]);
        _mm256_storeu_ps(out + (r0 + r) * K + k0 + 8, hi[r]);
      }
    }
  }
}
#endif  // CPU_CAPABILITY_AVX2

}  // namespace

#ifdef CPU_CAPABILITY_AVX2
LstmCellKernels<float> kernels_float() {
  return {&forward_row<float>, &backward_row<float>, &rec_forward_avx2, &rec_backward_avx2};
}
#else
LstmCellKernels<float> kernels_float() { return {&forward_row<float>, &backward_row<float>}; }
#endif
LstmCellKernels<double> kernels_double() { return {&forward_row<double>, &backward_row<double>}; }

}  // namespace CNNLSTM_CELL_NS
}  // namespace cnnlstm_ext
