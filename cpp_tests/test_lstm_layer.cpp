// C++ checks of the CPU LSTM layer op through the dispatcher, against values computed by hand
// from the LSTM equations (no PyTorch autograd, no Python).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const std::string& what) {
  if (!(std::abs(got - want) <= tol * (1.0 + std::abs(want)))) {
    std::printf("FAIL %s: got %.12g, want %.12g\n", what.c_str(), got, want);
    ++failures;
  }
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    bool);
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    bool);

// The op's per-direction weight list [w_ih, w_hh, (b_ih, b_hh)] x D from stacked [D, ...] tensors;
// the bias goes to b_ih, with a zero b_hh.
std::vector<at::Tensor> per_direction(const at::Tensor& wi, const at::Tensor& wh, const at::Tensor& b = {}) {
  std::vector<at::Tensor> weights;
  for (int64_t d = 0; d < wi.size(0); ++d) {
    weights.push_back(wi[d]);
    weights.push_back(wh[d]);
    if (b.defined()) {
      weights.push_back(b[d]);
      weights.push_back(at::zeros_like(b[d]));
    }
  }
  return weights;
}

auto forward_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("cnnlstm_ext::lstm_layer_forward", "").typed<Forward>();
}
auto backward_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("cnnlstm_ext::lstm_layer_backward", "").typed<Backward>();
}

// One hidden unit, one input feature, two directions, T = 3, B = 2 with lengths {3, 2}.
// Every value is recomputed here from i = s(w_i x + u_i h + b_i), ..., c' = f c + i g, h' = o tanh(c').
void test_forward_matches_hand_computation() {
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const double xs[3][2] = {{0.5, -1.0}, {0.25, 2.0}, {-0.75, 9.0}};  // x[t][b]; x[2][1] is padding
  const double w_ih[2][4] = {{0.3, -0.2, 0.5, 0.1}, {-0.4, 0.6, 0.2, -0.3}};
  const double w_hh[2][4] = {{0.7, 0.1, -0.6, 0.4}, {0.2, -0.5, 0.3, 0.8}};
  const double bias[2][4] = {{0.05, 0.5, -0.1, 0.2}, {-0.2, 0.1, 0.3, -0.05}};
  const double h0[2][2] = {{0.1, -0.2}, {0.3, 0.0}};
  const double c0[2][2] = {{-0.1, 0.4}, {0.2, -0.3}};
  const int64_t lengths[2] = {3, 2};
  auto x = at::empty({3, 2, 1}, opt), wi = at::empty({2, 4, 1}, opt), wh = at::empty({2, 4, 1}, opt);
  auto b = at::empty({2, 4}, opt), h = at::empty({2, 2, 1}, opt), c = at::empty({2, 2, 1}, opt);
  for (int t = 0; t < 3; ++t)
    for (int n = 0; n < 2; ++n) x[t][n][0] = xs[t][n];
  for (int d = 0; d < 2; ++d) {
    for (int g = 0; g < 4; ++g) {
      wi[d][g][0] = w_ih[d][g];
      wh[d][g][0] = w_hh[d][g];
      b[d][g] = bias[d][g];
    }
    for (int n = 0; n < 2; ++n) {
      h[d][n][0] = h0[d][n];
      c[d][n][0] = c0[d][n];
    }
  }
  auto L = at::tensor(std::vector<int64_t>{lengths[0], lengths[1]});
  auto [y, h_n, c_n, gates, cell] = forward_op().call(x, per_direction(wi, wh, b), h, c, L, true);

  for (int d = 0; d < 2; ++d) {
    for (int n = 0; n < 2; ++n) {
      double hv = h0[d][n], cv = c0[d][n];
      const int len = static_cast<int>(lengths[n]);
      for (int s = 0; s < len; ++s) {
        const int t = d == 0 ? s : len - 1 - s;
        const double xv = xs[t][n];
        const double i = sigmoid(w_ih[d][0] * xv + w_hh[d][0] * hv + bias[d][0]);
        const double f = sigmoid(w_ih[d][1] * xv + w_hh[d][1] * hv + bias[d][1]);
        const double g = std::tanh(w_ih[d][2] * xv + w_hh[d][2] * hv + bias[d][2]);
        const double o = sigmoid(w_ih[d][3] * xv + w_hh[d][3] * hv + bias[d][3]);
        cv = f * cv + i * g;
        hv = o * std::tanh(cv);
        const std::string at_ = "d=" + std::to_string(d) + " b=" + std::to_string(n) + " t=" + std::to_string(t);
        expect_near(y[t][n][d].item<double>(), hv, 1e-12, "y " + at_);
        expect_near(cell[t][n][d][0].item<double>(), cv, 1e-12, "cell " + at_);
        expect_near(gates[t][n][d][1].item<double>(), f, 1e-12, "forget gate " + at_);
      }
      for (int t = len; t < 3; ++t) expect_near(y[t][n][d].item<double>(), 0.0, 0.0, "padding is zero");
      expect_near(h_n[d][n][0].item<double>(), hv, 1e-12, "h_n d=" + std::to_string(d) + " b=" + std::to_string(n));
      expect_near(c_n[d][n][0].item<double>(), cv, 1e-12, "c_n d=" + std::to_string(d) + " b=" + std::to_string(n));
    }
  }

  // Backward of sum(y) + sum(h_n) against central differences of the same forward.
  auto loss = [&](const at::Tensor& xx, const at::Tensor& ww) {
    auto [yy, hh, cc, gg, ce] = forward_op().call(xx, per_direction(wi, ww, b), h, c, L, false);
    return yy.sum().item<double>() + hh.sum().item<double>();
  };
  auto ones_y = at::ones_like(y), ones_h = at::ones_like(h_n), zeros_c = at::zeros_like(c_n);
  auto grads = backward_op().call(ones_y, ones_h, zeros_c, x, per_direction(wi, wh, b), h, c, L, y, gates, cell, true);
  const double eps = 1e-6;
  for (int t = 0; t < 3; ++t) {
    for (int n = 0; n < 2; ++n) {
      auto xp = x.clone(), xm = x.clone();
      xp[t][n][0] += eps;
      xm[t][n][0] -= eps;
      const double fd = (loss(xp, wh) - loss(xm, wh)) / (2 * eps);
      expect_near(std::get<0>(grads)[t][n][0].item<double>(), fd, 1e-7,
                  "grad_x t=" + std::to_string(t) + " b=" + std::to_string(n));
    }
  }
  for (int d = 0; d < 2; ++d) {
    for (int g = 0; g < 4; ++g) {
      auto wp = wh.clone(), wm = wh.clone();
      wp[d][g][0] += eps;
      wm[d][g][0] -= eps;
      const double fd = (loss(x, wp) - loss(x, wm)) / (2 * eps);
      expect_near(std::get<2>(grads)[d][g][0].item<double>(), fd, 1e-7,
                  "grad_w_hh d=" + std::to_string(d) + " gate=" + std::to_string(g));
    }
  }
}

void test_bad_input_is_refused() {
  const auto opt = at::TensorOptions().dtype(at::kFloat);
  auto x = at::randn({4, 2, 3}, opt), wi = at::randn({1, 8, 3}, opt), wh = at::randn({1, 8, 2}, opt);
  auto h = at::zeros({1, 2, 2}, opt), c = at::zeros({1, 2, 2}, opt);
  struct Case {
    const char* name;
    std::function<void()> run;
    const char* expect;
  } cases[] = {
      {"wrong w_ih shape", [&] { forward_op().call(x, per_direction(at::randn({1, 8, 4}, opt), wh), h, c, {}, false); }, "w_ih"},
      {"wrong h0 shape", [&] { forward_op().call(x, per_direction(wi, wh), at::zeros({1, 3, 2}, opt), c, {}, false); }, "h0"},
      {"3 weights", [&] { forward_op().call(x, {wi[0], wh[0], wh[0]}, h, c, {}, false); }, "2 tensors per direction"},
      {"length 0", [&] { forward_op().call(x, per_direction(wi, wh), h, c, at::tensor(std::vector<int64_t>{0, 4}), false); }, "lengths"},
      {"length > T", [&] { forward_op().call(x, per_direction(wi, wh), h, c, at::tensor(std::vector<int64_t>{5, 4}), false); }, "lengths"},
      {"mixed dtype", [&] { forward_op().call(x, per_direction(wi.to(at::kDouble), wh), h, c, {}, false); }, "dtype"},
  };
  for (auto& cs : cases) {
    bool threw = false;
    try {
      cs.run();
    } catch (const c10::Error& e) {
      threw = std::string(e.what()).find(cs.expect) != std::string::npos;
      if (!threw) std::printf("FAIL %s: message lacks '%s': %s\n", cs.name, cs.expect, e.what());
    }
    if (!threw) {
      std::printf("FAIL %s: no clear error\n", cs.name);
      ++failures;
    }
  }
}

// The op called from a parallel region of the caller's, with more threads than torch's pool
// (bfloat16, whose forward keeps buffers per thread of at::parallel_for): every thread's result
// matches the serial one (to bfloat16 rounding: the GEMMs may split their sums otherwise there).
void test_bfloat16_from_a_larger_parallel_region() {
#ifdef _OPENMP
  const auto opt = at::TensorOptions().dtype(at::kBFloat16);
  at::manual_seed(0);
  const int64_t T = 4, B = 5, I = 8, H = 32, D = 2;
  auto x = at::randn({T, B, I}, opt), wi = at::randn({D, 4 * H, I}, opt) * 0.3;
  auto wh = at::randn({D, 4 * H, H}, opt) * 0.3, b = at::randn({D, 4 * H}, opt);
  auto h = at::randn({D, B, H}, opt), c = at::randn({D, B, H}, opt);
  const auto weights = per_direction(wi, wh, b);
  const at::Tensor serial = std::get<0>(forward_op().call(x, weights, h, c, {}, false));
  const int threads = 2 * at::get_num_threads() + 2;
  std::vector<int> equal(threads, 0);
#pragma omp parallel num_threads(threads)
  {
    const at::Tensor y = std::get<0>(forward_op().call(x, weights, h, c, {}, false));
    equal[omp_get_thread_num()] = at::allclose(y, serial, 2e-2, 2e-2) ? 1 : 0;
  }
  for (int t = 0; t < threads; ++t) {
    if (!equal[t]) {
      std::printf("FAIL bfloat16 forward from thread %d of a caller's parallel region\n", t);
      ++failures;
    }
  }
#endif
}

}  // namespace

int main() {
  test_forward_matches_hand_computation();
  test_bad_input_is_refused();
  test_bfloat16_from_a_larger_parallel_region();
  if (failures == 0) std::printf("all C++ LSTM layer checks passed\n");
  return failures == 0 ? 0 : 1;
}
