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
                 acc_t* g_row, acc_t* cl_row, int64_t H) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + V <= H; j += V) {
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
  for (; j < H; ++j) {
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
                  acc_t* dG_row, int64_t H) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec one(acc_t(1));
  int64_t j = 0;
  for (; j + V <= H; j += V) {
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
  for (; j < H; ++j) {
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

}  // namespace

LstmCellKernels<float> kernels_float() { return {&forward_row<float>, &backward_row<float>}; }
LstmCellKernels<double> kernels_double() { return {&forward_row<double>, &backward_row<double>}; }

}  // namespace CNNLSTM_CELL_NS
}  // namespace cnnlstm_ext
