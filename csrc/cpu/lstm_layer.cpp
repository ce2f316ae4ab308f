// CPU kernels of lstm_layer_forward / lstm_layer_backward.
//
// Forward: the input projection of every step and both directions is one GEMM
//   xproj: [T*B, D*4H] = x: [T*B, I] . w_ih^T: [I, D*4H] + bias
// then per step s the recurrent product h_{s-1} . w_hh^T and the gate nonlinearities and cell
// update: with the vector kernels of lstm_cell.h, in one parallel region whose tasks own slices
// of hidden units; otherwise a batched GEMM (both directions) and a parallel, vectorised loop over
// rows. Direction 1 runs in reverse time;
// with `lengths`, sequence b covers steps s < lengths[b] at time t = s (forward) or
// t = lengths[b] - 1 - s (reverse), so no work is done on padding.
// Backward mirrors it: a reverse-time loop produces the pre-activation gate gradients dG, then the
// weight, bias and input gradients are large GEMMs/reductions over all T*B rows.
// Bfloat16/float16 inputs are computed in float32 (the accumulation dtype), except the large
// products of bfloat16 on a CPU with AVX512-BF16 (bf16_products).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "cpu/lstm_cell.h"
#include "kernel_trace.h"
#include "lstm_layer.h"

namespace cnnlstm_ext {
namespace {

// Per-sequence lengths as a host array (all T when absent).
std::vector<int64_t> host_lengths(const c10::optional<at::Tensor>& lengths, const LstmDims& d) {
  std::vector<int64_t> L(d.B, d.T);
  if (lengths.has_value()) {
    auto Lc = lengths->contiguous();
    std::copy(Lc.data_ptr<int64_t>(), Lc.data_ptr<int64_t>() + d.B, L.begin());
  }
  return L;
}

// Rows (sequence x direction) per parallel task: about 2048 hidden units of gate math each, so a
// small layer runs on one thread; waking the pool every step costs more than such work, and much
// more when the cores are shared.
inline int64_t rows_per_task(int64_t H) { return std::max<int64_t>(1, 2048 / H); }

// A [T, B, ...] output whose valid steps the recurrence writes: zero-filled only when some steps
// are padding (with lengths), since those are never visited.
at::Tensor padded_output(at::IntArrayRef size, const at::TensorOptions& options,
                         const c10::optional<at::Tensor>& lengths) {
  return lengths.has_value() ? at::zeros(size, options) : at::empty(size, options);
}

// Time index of step s for sequence b in direction dir.
inline int64_t time_index(int64_t dir, int64_t s, int64_t len) { return dir == 0 ? s : len - 1 - s; }

// The large GEMMs (input projection; input and input-weight gradients): a: [M, K] . b^T, b: [N, K]
// (any strides) -> [M, N] (+ bias [N]), contiguous.
// In float32 through oneDNN's matmul where this torch has it (mkldnn::_linear_pointwise, the op
// of torch's oneDNN build that inductor uses for frozen CPU linear layers): on the x86 CPU
// measured here (AMD EPYC, Zen 4) it runs these shapes 10-30% faster than ATen's mm (MKL's
// sgemm), and nn.LSTM's oneDNN RNN runs its GEMMs at that rate. bfloat16 (the forward's
// projection on AVX512-BF16 CPUs) too: 0-5% faster than ATen's addmm there.
// Otherwise, with CNNLSTM_EXT_CPU_GEMM=aten, or while torch.backends.mkldnn is disabled (as
// nn.LSTM then leaves oneDNN too), ATen's mm/addmm.
at::Tensor mm_bt(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias) {
  using Linear = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            c10::string_view, c10::List<c10::optional<c10::Scalar>>,
                            c10::optional<c10::string_view>);
  static const auto onednn = []() -> c10::optional<c10::TypedOperatorHandle<Linear>> {
    const char* choice = std::getenv("CNNLSTM_EXT_CPU_GEMM");
    const std::string gemm = choice && *choice ? choice : "auto";
    TORCH_CHECK(gemm == "auto" || gemm == "aten" || gemm == "onednn",
                "CNNLSTM_EXT_CPU_GEMM must be auto, aten or onednn, got '", gemm, "'");
    const auto op = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    const bool usable = op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU);
    TORCH_CHECK(usable || gemm != "onednn",
                "CNNLSTM_EXT_CPU_GEMM=onednn, but this torch has no CPU mkldnn::_linear_pointwise");
    if (!usable || gemm == "aten") return c10::nullopt;
    try {
      return op->typed<Linear>();  // checks the schema against Linear
    } catch (const c10::Error&) {
      TORCH_CHECK(gemm != "onednn", "CNNLSTM_EXT_CPU_GEMM=onednn, but this torch's "
                  "mkldnn::_linear_pointwise has another signature: ", op->schema());
      return c10::nullopt;
    }
  }();
  if (onednn.has_value() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) &&
      at::globalContext().userEnabledMkldnn()) {
    record_kernel("cpu:gemm:onednn");
    return onednn->call(a, b, bias, "none", c10::List<c10::optional<c10::Scalar>>(), c10::nullopt);
  }
  record_kernel("cpu:gemm:aten");
  return bias.has_value() ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
}

// bfloat16 inputs on a CPU with AVX512-BF16 run the large products with bfloat16 operands and
// float32 sums: the forward's input projection and recurrent product, the backward's GEMMs (of
// dG rounded once to bfloat16), at twice the multiply-adds per instruction of float32, as
// nn.LSTM's oneDNN RNN runs them. Everything else is computed in float32.
bool bf16_products(const at::Tensor& x, int64_t H) {
  static const bool available = [] {
    const auto k = lstm_cell_kernels<float>();
    return k.recurrent_product_bf16 && k.to_bf16 && k.forward_bf16 && k.backward_bf16;
  }();
  return x.scalar_type() == at::kBFloat16 && H % kRecColumns == 0 && available;
}

// Whether the variant's recurrent-product kernel takes this layer (else at::bmm).
template <typename acc_t>
bool use_rec_kernel(RecurrentProductFn<acc_t> kernel, int64_t H) {
  return kernel != nullptr && H % kRecColumns == 0;
}

// Blocks of 16 rows of 32-bit words, [blocks, 16, cols] -> [blocks, cols, 16]: the packing of
// float32 w_hh (words = units) and of bfloat16 w_hh (words = pairs of units). With the variant's
// register transposes where it has them.
void transpose_word_blocks(const uint32_t* src, uint32_t* dst, int64_t blocks, int64_t cols) {
  constexpr int64_t V = kRecColumns;
  const Transpose16Fn transpose16 = lstm_cell_kernels<float>().transpose16;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint32_t* rows = src + blk * V * cols;
      uint32_t* out = dst + blk * V * cols;
      if (transpose16 && cols % 8 == 0) {
        transpose16(rows, cols, out, cols);
        continue;
      }
      for (int64_t k = 0; k < cols; ++k)
        for (int64_t i = 0; i < V; ++i) out[k * V + i] = rows[i * cols + k];
    }
  });
}

// The recurrent product's w operand (lstm_cell.h), packed by blocks of kRecColumns (16) output
// columns, from w_hh: [D, 4H, H] (contiguous). Packed once per call: 4 MiB per direction at
// H = 512, against T steps that each read all of it. (ATen's strided copy made these layouts at
// 3 to 4 GB/s here: 5% of a training call.)
//   forward:  columns = gate rows n, P[d][n / 16][k][n % 16] = w[d][n][k] -> [D, 4H / 16, H, 16]
//   backward: columns = units k,     P[d][k / 16][n][k % 16] = w[d][n][k] -> [D, H / 16, 4H, 16]
template <typename acc_t>
at::Tensor pack_w_hh(const at::Tensor& w_hh, bool forward) {
  constexpr int64_t V = kRecColumns;
  const int64_t D = w_hh.size(0), G = w_hh.size(1), H = w_hh.size(2);
  auto packed = forward ? at::empty({D, G / V, H, V}, w_hh.options())
                        : at::empty({D, H / V, G, V}, w_hh.options());
  const acc_t* src = w_hh.data_ptr<acc_t>();
  acc_t* dst = packed.data_ptr<acc_t>();
  if (forward && sizeof(acc_t) == sizeof(uint32_t)) {
    transpose_word_blocks(reinterpret_cast<const uint32_t*>(src), reinterpret_cast<uint32_t*>(dst),
                          D * G / V, H);
  } else if (forward) {
    // A task transposes blocks of 16 rows [16, H] into [H, 16] (both at blk * 16 * H).
    at::parallel_for(0, D * G / V, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const acc_t* rows = src + blk * V * H;
        acc_t* out = dst + blk * V * H;
        for (int64_t k = 0; k < H; ++k)
          for (int64_t i = 0; i < V; ++i) out[k * V + i] = rows[i * H + k];
      }
    });
  } else {
    // A task reads whole rows (d, n) and scatters their 16-column pieces to the H / 16 blocks.
    at::parallel_for(0, D * G, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t d = r / G, n = r % G;
        const acc_t* row = src + r * H;
        acc_t* out = dst + (d * H / V * G + n) * V;
        for (int64_t kb = 0; kb < H / V; ++kb)
          std::copy(row + kb * V, row + (kb + 1) * V, out + kb * G * V);
      }
    });
  }
  return packed;
}

// The bfloat16 product's w operand (lstm_cell.h) from w_hh: [D, 4H, H] bfloat16 (contiguous), by
// blocks of kRecColumns gate columns n and pairs of units k:
//   P[d][n / 16][k / 2][n % 16][k % 2] = w[d][n][k] -> [D, 4H / 16, H / 2, 16, 2]
at::Tensor pack_w_hh_bf16(const at::Tensor& w_hh) {
  constexpr int64_t V = kRecColumns;
  const int64_t D = w_hh.size(0), G = w_hh.size(1), H = w_hh.size(2);
  auto packed = at::empty({D, G / V, H / 2, V, 2}, w_hh.options());
  // Blocks of 16 rows [16, H] into [H / 2, 16, 2]: the rows' pairs of units are 32-bit words.
  transpose_word_blocks(reinterpret_cast<const uint32_t*>(w_hh.const_data_ptr<at::BFloat16>()),
                        reinterpret_cast<uint32_t*>(packed.data_ptr<at::BFloat16>()), D * G / V,
                        H / 2);
  return packed;
}

// With a recurrent-product kernel, a time step is one parallel region: a task owns a slice of
// kUnits hidden units of one direction, computes their gate columns of the recurrent product
// and runs their cell update. (A region for the product and another for the cells, the path
// through at::bmm, pays the wake-up of the thread pool twice per step.) The state the tasks read
// whole (h forward, the gate gradients backward) is double-buffered.
constexpr int64_t kUnits = 4 * kRecColumns;

// Runs body(dir, j0, j1) for every (direction, unit slice), spread over the threads.
template <typename Body>
void for_unit_slices(int64_t D, int64_t H, const Body& body) {
  const int64_t slices = (H + kUnits - 1) / kUnits;
  at::parallel_for(0, D * slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j0 = (i % slices) * kUnits;
      body(i / slices, j0, std::min(H, j0 + kUnits));
    }
  });
}

template <typename acc_t>
void forward_steps(const LstmDims& d, const std::vector<int64_t>& L,
                   const at::Tensor& xproj,  // [T, B, D, 4H] io (see bf16_product)
                   const at::Tensor& w_hh,    // [D, 4H, H] acc, contiguous (bfloat16 if:)
                   bool bf16_product,         // the product in bfloat16 (float32 acc only);
                                              // then io is bfloat16, else acc
                   at::Tensor& h,             // [D, B, H] acc, h0 in, h_n out
                   at::Tensor& c,             // [D, B, H] acc, c0 in, c_n out
                   at::Tensor& y,             // [T, B, D*H] io (zeros on padding)
                   at::Tensor* gates,         // [T, B, D, 4H] io or null
                   at::Tensor* cell) {        // [T, B, D, H] io or null
  const int64_t B = d.B, D = d.D, H = d.H, G = 4 * H;
  const int64_t steps = *std::max_element(L.begin(), L.end());
  auto rec = at::empty({D, B, G}, c.options());  // recurrent part h_{s-1} . w_hh^T
  acc_t* rp = rec.data_ptr<acc_t>();
  acc_t* cp = c.data_ptr<acc_t>();
  // The io tensors' data, as io_t (acc_t, or bfloat16 bits) in cell_update_with.
  TORCH_INTERNAL_ASSERT(xproj.scalar_type() == (bf16_product ? at::kBFloat16 : c.scalar_type()) &&
                        y.scalar_type() == xproj.scalar_type());
  const void* xp = xproj.const_data_ptr();
  void* yp = y.data_ptr();
  void* gp = gates ? gates->data_ptr() : nullptr;
  void* clp = cell ? cell->data_ptr() : nullptr;
  const auto cell_kernels = lstm_cell_kernels<acc_t>();
  const bool rec_kernel = use_rec_kernel(cell_kernels.recurrent_product, H);
  record_kernel(std::string("cpu:lstm_forward:") +
                (bf16_product ? "bf16-avx512" : rec_kernel ? cell_kernels.product_isa : "bmm") +
                ":cell-" + cell_kernels.cell_isa);
  // Cell update of units [j0, j1) of row (dir, b) at step s, reading h_{s-1} from h_in, with
  // kernel(x_row, r_row, c_row, h_row, y_row, g_row, cl_row, n, H) on io_t tensors.
  auto cell_update_with = [&](auto kernel, auto io, int64_t s, int64_t dir, int64_t b,
                              int64_t j0, int64_t j1, const acc_t* h_in, acc_t* h_out) {
    using io_t = decltype(io);
    const int64_t row = dir * B + b, len = L[b];
    if (s >= len) {  // sequence finished: its state carries to h_n/c_n unchanged
      if (h_out != h_in) std::copy(h_in + row * H + j0, h_in + row * H + j1, h_out + row * H + j0);
      return;
    }
    const int64_t t = time_index(dir, s, len), at_t = (t * B + b) * D + dir;
    kernel(static_cast<const io_t*>(xp) + at_t * G + j0, rp + row * G + j0, cp + row * H + j0,
           h_out + row * H + j0, static_cast<io_t*>(yp) + (t * B + b) * D * H + dir * H + j0,
           gp ? static_cast<io_t*>(gp) + at_t * G + j0 : nullptr,
           clp ? static_cast<io_t*>(clp) + at_t * H + j0 : nullptr, j1 - j0, H);
  };
  auto cell_update = [&](int64_t s, int64_t dir, int64_t b, int64_t j0, int64_t j1,
                         const acc_t* h_in, acc_t* h_out) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (bf16_product) {
        cell_update_with(cell_kernels.forward_bf16, uint16_t(0), s, dir, b, j0, j1, h_in, h_out);
        return;
      }
    }
    cell_update_with(cell_kernels.forward, acc_t(0), s, dir, b, j0, j1, h_in, h_out);
  };
  if (!rec_kernel) {
    TORCH_INTERNAL_ASSERT(!bf16_product, "the bfloat16 product needs the recurrent kernels");
    acc_t* hp = h.data_ptr<acc_t>();
    // [D, H, 4H], copied once: MKL's per-step bmm runs several times faster on a contiguous
    // operand than on the transposed view.
    const auto w_hh_t = w_hh.transpose(1, 2).contiguous();
    for (int64_t s = 0; s < steps; ++s) {
      at::bmm_out(rec, h, w_hh_t);
      at::parallel_for(0, D * B, rows_per_task(H), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) cell_update(s, row / B, row % B, 0, H, hp, hp);
      });
    }
    return;
  }
  auto h_other = h.clone();  // rows of finished sequences must match in both buffers
  acc_t* h_in = h.data_ptr<acc_t>();
  acc_t* h_out = h_other.data_ptr<acc_t>();
  const at::Tensor w_packed = bf16_product ? pack_w_hh_bf16(w_hh) : pack_w_hh<acc_t>(w_hh, true);
  const std::vector<acc_t> zeros(H, acc_t(0));
  // The bfloat16 product reads h_{s-1} rounded to bfloat16: each thread rounds the rows of a
  // direction once per step, into its own buffer ([threads, D, B * H], with the step it holds).
  const int64_t threads = bf16_product ? at::get_num_threads() : 0;
  std::vector<uint16_t> h_bf16(threads * D * B * H);
  std::vector<int64_t> h_bf16_step(threads * D, -1);
  for (int64_t s = 0; s < steps; ++s) {
    for_unit_slices(D, H, [&](int64_t dir, int64_t j0, int64_t j1) {
      if constexpr (std::is_same_v<acc_t, float>) {
        if (bf16_product) {
          // at::parallel_for numbers its threads from 0 (0 when it runs inline, as inside a
          // caller's parallel region).
          const int64_t thread = at::get_thread_num();
          TORCH_INTERNAL_ASSERT(thread < threads, "thread ", thread, " of ", threads);
          const int64_t slot = thread * D + dir;
          uint16_t* hb = h_bf16.data() + slot * B * H;
          if (h_bf16_step[slot] != s) {
            cell_kernels.to_bf16(h_in + dir * B * H, hb, B * H);
            h_bf16_step[slot] = s;
          }
          const auto* wp =
              reinterpret_cast<const uint16_t*>(w_packed.const_data_ptr<at::BFloat16>());
          for (int64_t g = 0; g < 4; ++g)
            cell_kernels.recurrent_product_bf16(hb, wp + dir * G * H, rp + dir * B * G, B, H, G,
                                                g * H + j0, g * H + j1);
          for (int64_t b = 0; b < B; ++b) cell_update(s, dir, b, j0, j1, h_in, h_out);
          return;
        }
      }
      const acc_t* wp = w_packed.const_data_ptr<acc_t>();
      for (int64_t g = 0; g < 4; ++g)  // gate g's columns of this slice
        cell_kernels.recurrent_product(h_in + dir * B * H, wp + dir * G * H, rp + dir * B * G, B,
                                       H, G, g * H + j0, g * H + j1, zeros.data());
      for (int64_t b = 0; b < B; ++b) cell_update(s, dir, b, j0, j1, h_in, h_out);
    });
    std::swap(h_in, h_out);
  }
  if (h_in != h.data_ptr<acc_t>()) h.copy_(h_other);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cpu(
    const at::Tensor& x_in, at::TensorList weights, const at::Tensor& h0, const at::Tensor& c0,
    const c10::optional<at::Tensor>& lengths, bool train) {
  // Autocast must not reach the ATen calls below (an autocast addmm would hand back a bfloat16
  // xproj to a float kernel); the Python wrapper applies autocast's dtype before the op.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "lstm_layer_forward";
  const auto [w_ih, w_hh, bias_t, wdt] = layer_weights(op, x_in, weights, h0);
  const auto bias = bias_t.defined() ? c10::optional<at::Tensor>(bias_t) : c10::nullopt;
  const auto d = check_lstm_inputs(op, x_in, w_ih, w_hh, bias, h0, c0, lengths);
  const auto L = host_lengths(lengths, d);
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, G = 4 * H;
  const auto acc = acc_dtype(x_in.scalar_type());
  // With the bfloat16 products, the projection stays in bfloat16 (the GEMM's output) and the
  // cell kernels write y, gates and cell in bfloat16 too: no [T, B, ...] tensor in float32.
  const bool bf16_product = bf16_products(x_in, H);
  const auto gemm_dtype = bf16_product ? at::kBFloat16 : acc;
  const auto opts = x_in.options().dtype(gemm_dtype);
  auto x = x_in.to(gemm_dtype).contiguous();
  auto w_ih_g = w_ih.to(gemm_dtype).reshape({D * G, d.I});
  auto w_hh_g = w_hh.to(gemm_dtype).contiguous();
  // xproj: [T*B, D*4H], both directions in one GEMM.
  const auto b_g = bias.has_value()
                       ? c10::optional<at::Tensor>(bias->to(gemm_dtype).reshape({D * G}))
                       : c10::nullopt;
  const auto xproj = mm_bt(x.view({T * B, d.I}), w_ih_g, b_g).view({T, B, D, G});
  auto h = h0.to(acc).contiguous().clone();
  auto c = c0.to(acc).contiguous().clone();
  // The recurrence writes every valid step; padding (steps past a length) must read as zeros.
  auto y = padded_output({T, B, D * H}, opts, lengths);
  at::Tensor gates, cell;
  if (train) {
    gates = padded_output({T, B, D, G}, opts, lengths);
    cell = padded_output({T, B, D, H}, opts, lengths);
  } else {
    gates = at::empty({0}, opts);
    cell = at::empty({0}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "lstm_layer_forward_cpu", [&] {
    forward_steps<scalar_t>(d, L, xproj, w_hh_g, bf16_product, h, c, y, train ? &gates : nullptr,
                            train ? &cell : nullptr);
  });
  const auto dt = x_in.scalar_type();
  // Saved for backward in x's dtype, as on CUDA (see check_lstm_backward_inputs).
  return {y.to(dt), h.to(dt), c.to(dt), gates.to(dt), cell.to(dt)};
}

template <typename acc_t>
void backward_steps(const LstmDims& d, const std::vector<int64_t>& L,
                    bool bf16_io,              // io is bfloat16 (float32 acc only), else acc
                    const at::Tensor& grad_y,  // [T, B, D*H] io
                    const at::Tensor& gates,   // [T, B, D, 4H] io
                    const at::Tensor& cell,    // [T, B, D, H] io
                    const at::Tensor& c0,      // [D, B, H] io
                    const at::Tensor& w_hh,    // [D, 4H, H] acc
                    at::Tensor& dh,            // [D, B, H] acc: grad_h_n in, grad_h0 out
                    at::Tensor& dc,            // [D, B, H] acc: grad_c_n in, grad_c0 out
                    at::Tensor& dG) {          // [T, B, D, 4H] io: gate grads (zeros on padding)
  const int64_t B = d.B, D = d.D, H = d.H, G = 4 * H;
  const int64_t steps = *std::max_element(L.begin(), L.end());
  // dG_step: [D, B, 4H] one step's gate gradients, rows of finished sequences zero;
  // dh_rec: [D, B, H] = dG_{s+1} . w_hh, the gradient reaching h_s through the recurrence.
  auto dG_step = at::zeros({D, B, G}, dh.options());
  auto dh_rec = at::zeros({D, B, H}, dh.options());
  acc_t* dhp = dh.data_ptr<acc_t>();
  acc_t* dcp = dc.data_ptr<acc_t>();
  acc_t* drp = dh_rec.data_ptr<acc_t>();
  // The io tensors' data, as io_t (acc_t, or bfloat16 bits) in cell_update_with.
  const auto io = dG.scalar_type();
  TORCH_INTERNAL_ASSERT(io == (bf16_io ? at::kBFloat16 : dh.scalar_type()) &&
                        grad_y.scalar_type() == io && gates.scalar_type() == io &&
                        cell.scalar_type() == io && c0.scalar_type() == io);
  const void* gyp = grad_y.const_data_ptr();
  const void* gp = gates.const_data_ptr();
  const void* clp = cell.const_data_ptr();
  const void* c0p = c0.const_data_ptr();
  void* dGp = dG.data_ptr();
  const auto cell_kernels = lstm_cell_kernels<acc_t>();
  const bool rec_kernel = use_rec_kernel(cell_kernels.recurrent_product, H);
  record_kernel(std::string("cpu:lstm_backward:") +
                (rec_kernel ? cell_kernels.product_isa : "bmm") + ":cell-" +
                cell_kernels.cell_isa + (bf16_io ? ":io-bf16" : ""));
  // Cell backward of units [j0, j1) of row (dir, b) at step s, writing its gate gradients to ds,
  // with kernel(g_row, c_row, cprev_row, gy_row, dh_in, dc_row, ds_row, dG_row, n, H) on io_t
  // tensors.
  auto cell_update_with = [&](auto kernel, auto io, int64_t s, int64_t dir, int64_t b,
                              int64_t j0, int64_t j1, acc_t* ds) {
    using io_t = decltype(io);
    const int64_t row = dir * B + b, len = L[b];
    acc_t* ds_row = ds + row * G;
    if (s >= len) {
      for (int64_t g = 0; g < 4; ++g) std::fill(ds_row + g * H + j0, ds_row + g * H + j1, acc_t(0));
      return;
    }
    const int64_t t = time_index(dir, s, len), at_t = (t * B + b) * D + dir;
    const io_t* cl = static_cast<const io_t*>(clp);
    // The first step processed for b takes grad_h_n; later ones the recurrent gradient.
    const acc_t* dh_in = (s + 1 < len) ? drp + row * H : dhp + row * H;
    const io_t* cprev_row = s == 0 ? static_cast<const io_t*>(c0p) + row * H
                                   : cl + ((time_index(dir, s - 1, len) * B + b) * D + dir) * H;
    kernel(static_cast<const io_t*>(gp) + at_t * G + j0, cl + at_t * H + j0, cprev_row + j0,
           static_cast<const io_t*>(gyp) + (t * B + b) * D * H + dir * H + j0, dh_in + j0,
           dcp + row * H + j0, ds_row + j0, static_cast<io_t*>(dGp) + at_t * G + j0, j1 - j0, H);
  };
  auto cell_update = [&](int64_t s, int64_t dir, int64_t b, int64_t j0, int64_t j1, acc_t* ds) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (bf16_io) {
        cell_update_with(cell_kernels.backward_bf16, uint16_t(0), s, dir, b, j0, j1, ds);
        return;
      }
    }
    cell_update_with(cell_kernels.backward, acc_t(0), s, dir, b, j0, j1, ds);
  };
  if (!rec_kernel) {
    TORCH_INTERNAL_ASSERT(!bf16_io, "the bfloat16 products need the recurrent kernels");
    acc_t* dsp = dG_step.data_ptr<acc_t>();
    for (int64_t s = steps - 1; s >= 0; --s) {
      at::parallel_for(0, D * B, rows_per_task(H), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) cell_update(s, row / B, row % B, 0, H, dsp);
      });
      at::bmm_out(dh_rec, dG_step, w_hh);
    }
    dh.copy_(dh_rec);  // step 0 is valid for every sequence: dh_rec holds grad_h0 for all rows
    return;
  }
  const at::Tensor w_packed = pack_w_hh<acc_t>(w_hh, /*forward=*/false);
  const acc_t* wp = w_packed.data_ptr<acc_t>();
  const std::vector<acc_t> zeros(G, acc_t(0));
  auto dG_other = at::zeros({D, B, G}, dh.options());
  acc_t* ds_in = dG_step.data_ptr<acc_t>();  // dG_{s+1}
  acc_t* ds_out = dG_other.data_ptr<acc_t>();
  // Units [j0, j1) of dh_rec = ds_in . w_hh for direction dir.
  auto product = [&](int64_t dir, int64_t j0, int64_t j1) {
    cell_kernels.recurrent_product(ds_in + dir * B * G, wp + dir * G * H, drp + dir * B * H, B, G,
                                   H, j0, j1, zeros.data());
  };
  for (int64_t s = steps - 1; s >= 0; --s) {
    for_unit_slices(D, H, [&](int64_t dir, int64_t j0, int64_t j1) {
      if (s + 1 < steps) product(dir, j0, j1);  // nothing flows back into the last step
      for (int64_t b = 0; b < B; ++b) cell_update(s, dir, b, j0, j1, ds_out);
    });
    std::swap(ds_in, ds_out);
  }
  for_unit_slices(D, H, product);  // step 0 is valid for every sequence: grad_h0
  dh.copy_(dh_rec);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& x_in,
                        at::TensorList weights, const at::Tensor& h0, const at::Tensor& c0,
                        const c10::optional<at::Tensor>& lengths, const at::Tensor& y,
                        const at::Tensor& gates, const at::Tensor& cell) {
  // Autocast must not reach the ATen calls below (an autocast addmm would hand back a bfloat16
  // xproj to a float kernel); the Python wrapper applies autocast's dtype before the op.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "lstm_layer_backward";
  const auto [w_ih, w_hh, no_bias, wdt] =
      layer_weights(op, x_in, weights, h0, /*with_bias=*/false);
  const auto d = check_lstm_inputs(op, x_in, w_ih, w_hh, c10::nullopt, h0, c0, lengths);
  check_lstm_backward_inputs(op, d, x_in, grad_y, grad_h_n, grad_c_n, y, gates, cell);
  const auto L = host_lengths(lengths, d);
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, G = 4 * H;
  const auto acc = acc_dtype(x_in.scalar_type());
  // With the bfloat16 products, the cell kernels read the saved bfloat16 tensors and write dG in
  // bfloat16, the GEMMs' operand: no [T, B, ...] tensor in float32, as in the forward.
  const bool bf16_product = bf16_products(x_in, H);
  const auto gemm_dtype = bf16_product ? at::kBFloat16 : acc;
  auto w_hh_a = w_hh.to(acc).contiguous();
  auto gy = grad_y.to(gemm_dtype).contiguous();
  auto dh = grad_h_n.to(acc).contiguous().clone();
  auto dc = grad_c_n.to(acc).contiguous().clone();
  auto dG = padded_output({T, B, D, G}, gy.options(), lengths);
  auto gates_c = gates.to(gemm_dtype).contiguous();
  auto cell_c = cell.to(gemm_dtype).contiguous();
  auto c0_c = c0.to(gemm_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "lstm_layer_backward_cpu", [&] {
    backward_steps<scalar_t>(d, L, bf16_product, gy, gates_c, cell_c, c0_c, w_hh_a, dh, dc, dG);
  });
  auto dG2 = dG.view({T * B, D * G});
  auto x = x_in.to(gemm_dtype).contiguous().view({T * B, d.I});
  auto grad_w_hh = recurrent_weight_grad(
      dG, y.to(gemm_dtype).contiguous(), h0.to(gemm_dtype).contiguous(),
      lengths.has_value() ? lengths->contiguous() : at::Tensor(),
      [](at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
        accumulate ? out.addmm_(a, b) : at::mm_out(out, a, b);
      });
  auto w_ih_g = w_ih.to(gemm_dtype).reshape({D * G, d.I});
  // [D, 4H, I]. at::mm takes dG2^T as a transposed operand, where oneDNN's linear (mm_bt) copies
  // it first: at::mm ran these shapes here 1.1-1.5x faster in bfloat16, and in float32 up to
  // 1.18x faster from T*B = 1024 rows (0.93x to 1.06x at 256).
  auto grad_w_ih = at::mm(dG2.t(), x).view({D, G, d.I});
  auto grad_bias = dG2.sum(0, /*keepdim=*/false, acc).view({D, G});  // [D, 4H], summed in acc
  auto grad_x = mm_bt(dG2, w_ih_g.t(), c10::nullopt);                 // [T*B, I]
  const auto dt = x_in.scalar_type();
  // Weight gradients in the dtype the weights came in (float32 master weights under autocast).
  return {grad_x.view({T, B, d.I}).to(dt), grad_w_ih.to(wdt), grad_w_hh.to(wdt), grad_bias.to(wdt),
          dh.to(dt), dc.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace cnnlstm_ext
