// The CPU LSTM's recurrence over time, forward and backward, for lstm_cpu.cpp (its only includer:
// definitions in an anonymous namespace). Each direction of a call runs one of a few algorithms,
// chosen from a table by what the CPU and the layer allow (forward_algorithm,
// backward_algorithm):
//   bmm:         per step, at::bmm for the recurrent product, then the cell updates of all rows
//                in a parallel loop (the baseline build, or H not a multiple of kRecColumns);
//   packed:      w_hh packed once; per step one parallel region whose tasks own slices of hidden
//                units, computing their gate columns of the product and their cell updates
//                (float32 from 32 rows on AVX-512: the product holds the batch in the vector
//                lanes and reads h_{s-1} transposed, see use_bt);
//   packed-bf16: as packed, with bfloat16 operands and float32 sums (forward; AVX512-BF16, or
//                AMX tiles from 4 rows where the CPU has AMX-BF16).
// With lengths, sequence b covers steps s < lengths[b] at time t = s (direction 0) or
// t = lengths[b] - 1 - s (direction 1), so no work is done on padding.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel_trace.h"
#include "lstm/lstm.h"
#include "lstm/lstm_cpu_cell.h"

namespace cnnlstm_ext::lstm {
namespace {

// Rows (sequence x direction) per parallel task: about 2048 hidden units of gate math each, so a
// small layer runs on one thread; waking the pool every step costs more than such work, and much
// more when the cores are shared.
inline int64_t rows_per_task(int64_t H) { return std::max<int64_t>(1, 2048 / H); }

// Time index of step s for sequence b in direction dir.
inline int64_t time_index(int64_t dir, int64_t s, int64_t len) { return dir == 0 ? s : len - 1 - s; }

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

// A layer's w_hh, one [4H, H] tensor per direction (contiguous, in the kernels' dtype): each
// direction read where it lies, as FusedLSTM keeps a CPU module's parameters apart (nn.LSTM's).
using DirectionWeights = std::vector<at::Tensor>;

// The recurrent product's w operand (lstm_cpu_cell.h), packed by blocks of kRecColumns (16) output
// columns, from w_hh (per direction [4H, H]). Packed once per call: 4 MiB per direction at
// H = 512, against T steps that each read all of it. (ATen's strided copy made these layouts at
// 3 to 4 GB/s here: 5% of a training call.)
//   forward:  columns = gate rows n, P[d][n / 16][k][n % 16] = w[d][n][k] -> [D, 4H / 16, H, 16]
//   backward: columns = units k,     P[d][k / 16][n][k % 16] = w[d][n][k] -> [D, H / 16, 4H, 16]
template <typename acc_t>
at::Tensor pack_w_hh(const DirectionWeights& w_hh, bool forward) {
  constexpr int64_t V = kRecColumns;
  const int64_t D = static_cast<int64_t>(w_hh.size()), G = w_hh[0].size(0), H = w_hh[0].size(1);
  auto packed = forward ? at::empty({D, G / V, H, V}, w_hh[0].options())
                        : at::empty({D, H / V, G, V}, w_hh[0].options());
  for (int64_t d = 0; d < D; ++d) {
    const acc_t* src = w_hh[d].const_data_ptr<acc_t>();
    acc_t* dst = packed.data_ptr<acc_t>() + d * G * H;
    if (forward && sizeof(acc_t) == sizeof(uint32_t)) {
      transpose_word_blocks(reinterpret_cast<const uint32_t*>(src),
                            reinterpret_cast<uint32_t*>(dst), G / V, H);
    } else if (forward) {
      // A task transposes blocks of 16 rows [16, H] into [H, 16] (both at blk * 16 * H).
      at::parallel_for(0, G / V, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          const acc_t* rows = src + blk * V * H;
          acc_t* out = dst + blk * V * H;
          for (int64_t k = 0; k < H; ++k)
            for (int64_t i = 0; i < V; ++i) out[k * V + i] = rows[i * H + k];
        }
      });
    } else {
      // A task reads whole rows n and scatters their 16-column pieces to the H / 16 blocks.
      at::parallel_for(0, G, 64, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const acc_t* row = src + n * H;
          acc_t* out = dst + n * V;
          for (int64_t kb = 0; kb < H / V; ++kb)
            std::copy(row + kb * V, row + (kb + 1) * V, out + kb * G * V);
        }
      });
    }
  }
  return packed;
}

// The bfloat16 product's w operand (lstm_cpu_cell.h) from w_hh (per direction [4H, H] bfloat16), by
// blocks of kRecColumns gate columns n and pairs of units k:
//   P[d][n / 16][k / 2][n % 16][k % 2] = w[d][n][k] -> [D, 4H / 16, H / 2, 16, 2]
at::Tensor pack_w_hh_bf16(const DirectionWeights& w_hh) {
  constexpr int64_t V = kRecColumns;
  const int64_t D = static_cast<int64_t>(w_hh.size()), G = w_hh[0].size(0), H = w_hh[0].size(1);
  auto packed = at::empty({D, G / V, H / 2, V, 2}, w_hh[0].options());
  // Blocks of 16 rows [16, H] into [H / 2, 16, 2]: the rows' pairs of units are 32-bit words.
  for (int64_t d = 0; d < D; ++d)
    transpose_word_blocks(
        reinterpret_cast<const uint32_t*>(w_hh[d].const_data_ptr<at::BFloat16>()),
        reinterpret_cast<uint32_t*>(packed.data_ptr<at::BFloat16>() + d * G * H), G / V, H / 2);
  return packed;
}

// With a recurrent-product kernel, a time step is one parallel region: a task owns a slice of
// kUnits hidden units of one direction, computes their gate columns of the recurrent product
// and runs their cell update. (A region for the product and another for the cells, the path
// through at::bmm, pays the wake-up of the thread pool twice per step.) The state the tasks read
// whole (h forward, the gate gradients backward) is double-buffered.
constexpr int64_t kUnits = 4 * kRecColumns;

// Runs step(dir, j0, j1, k) for k = 0 .. steps - 1 in order, for every direction and slice of
// hidden units; step k of a direction reads only what step k - 1 of that direction wrote. With
// more threads than directions, each step is one parallel region over (direction, slice) tasks.
// With no more threads than directions (2 cores, a bidirectional layer):
//  - from kDirectionThreadsMinBatch rows, each direction runs all its steps on one thread: the
//    directions are independent, so no thread waits for another at each step (a wait that costs
//    the pool's wake-up and, on shared cores, the slower thread's lag, step after step);
//  - below, where a direction has a slice for every thread, the directions run in turn, each
//    step one region over the direction's slices: the product of a small batch is bound by
//    reading w_hh (4 MiB per direction in float32 at H = 512, more than a core's L2), which the
//    threads then share, each reading its part of one direction's w from its own L2 (float32 at
//    B = 1: 1.16-1.28x nn.LSTM, against 0.88-0.91x with a thread per direction).
constexpr int64_t kDirectionThreadsMinBatch = 16;

template <typename Step>
void run_steps(int64_t D, int64_t B, int64_t H, int64_t steps, const Step& step) {
  const int64_t slices = (H + kUnits - 1) / kUnits;
  const auto slice = [&](int64_t dir, int64_t i, int64_t k) {
    step(dir, i * kUnits, std::min(H, (i + 1) * kUnits), k);
  };
  const int64_t threads = at::get_num_threads();
  if (threads <= D && (B >= kDirectionThreadsMinBatch || slices < threads)) {
    at::parallel_for(0, D, 1, [&](int64_t begin, int64_t end) {
      for (int64_t dir = begin; dir < end; ++dir)
        for (int64_t k = 0; k < steps; ++k)
          for (int64_t i = 0; i < slices; ++i) slice(dir, i, k);
    });
  } else if (threads <= D) {
    for (int64_t dir = 0; dir < D; ++dir)
      for (int64_t k = 0; k < steps; ++k)
        at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) slice(dir, i, k);
        });
  } else {
    for (int64_t k = 0; k < steps; ++k)
      at::parallel_for(0, D * slices, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) slice(i / slices, i % slices, k);
      });
  }
}

// --- forward ------------------------------------------------------------------------------------

// One forward recurrence: its operands and the cell update that every algorithm runs. io_t is
// the type of the [T, B, ...] tensors: acc_t, or bfloat16 bits (uint16_t) with the bf16 product.
template <typename acc_t>
struct ForwardRecurrence {
  LstmDims d;
  const std::vector<int64_t>* L;  // [B] lengths
  int64_t steps;                  // the longest length
  const DirectionWeights* w_hh;   // per direction [4H, H] acc_t (bfloat16 for packed-bf16)
  at::Tensor* h;                  // [D, B, H] acc_t: h0 in, h_n out
  at::Tensor rec;                 // [D, B, 4H] acc_t: the recurrent part h_{s-1} . w_hh^T
  acc_t* rp;                      // rec's data
  acc_t* c;                       // [D, B, H]: c0 in, c_n out
  const void* xproj[2];           // per direction [T, B, 4H] io: the input projection (bias
                                  // included)
  void* y;                        // [T, B, D*H] io (zeros on padding)
  void* gates;                    // [T, B, D, 4H] io or null (not training)
  void* cell;                     // [T, B, D, H] io or null
  LstmCellKernels<acc_t> kernels;

  // Cell update of units [j0, j1) of row (dir, b) at step s, reading h_{s-1} from h_in, with
  // kernel(x_row, r_row, c_row, h_row, y_row, g_row, cl_row, n, H) on io_t tensors.
  template <typename io_t, typename Kernel>
  void update(Kernel kernel, int64_t s, int64_t dir, int64_t b, int64_t j0, int64_t j1,
              const acc_t* h_in, acc_t* h_out) const {
    const int64_t B = d.B, D = d.D, H = d.H, G = 4 * H;
    const int64_t row = dir * B + b, len = (*L)[b];
    if (s >= len) {  // sequence finished: its state carries to h_n/c_n unchanged
      if (h_out != h_in) std::copy(h_in + row * H + j0, h_in + row * H + j1, h_out + row * H + j0);
      return;
    }
    const int64_t t = time_index(dir, s, len), at_t = (t * B + b) * D + dir;
    kernel(static_cast<const io_t*>(xproj[dir]) + (t * B + b) * G + j0, rp + row * G + j0,
           c + row * H + j0, h_out + row * H + j0,
           static_cast<io_t*>(y) + (t * B + b) * D * H + dir * H + j0,
           gates ? static_cast<io_t*>(gates) + at_t * G + j0 : nullptr,
           cell ? static_cast<io_t*>(cell) + at_t * H + j0 : nullptr, j1 - j0, H);
  }
};

template <typename acc_t>
void forward_bmm(ForwardRecurrence<acc_t>& r) {
  const int64_t B = r.d.B, D = r.d.D, H = r.d.H;
  acc_t* hp = r.h->template data_ptr<acc_t>();
  // [D, H, 4H], copied once: MKL's per-step bmm runs several times faster on a contiguous
  // operand than on the transposed view.
  const auto w_hh_t = at::stack(*r.w_hh).transpose(1, 2).contiguous();
  for (int64_t s = 0; s < r.steps; ++s) {
    at::bmm_out(r.rec, *r.h, w_hh_t);
    at::parallel_for(0, D * B, rows_per_task(H), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        r.template update<acc_t>(r.kernels.forward, s, row / B, row % B, 0, H, hp, hp);
    });
  }
}

// The packed algorithms: h double-buffered (the tasks of a step read h_{s-1} whole), and
// product(dir, j0, j1, s, h_in) computing the gate columns of units [j0, j1) of r.rec.
template <typename acc_t, typename io_t, typename Kernel, typename Product>
void forward_packed_steps(ForwardRecurrence<acc_t>& r, Kernel kernel, const Product& product) {
  const int64_t B = r.d.B;
  auto h_other = r.h->clone();  // rows of finished sequences must match in both buffers
  // Step s reads h_{s-1} from buffer s % 2 and writes h_s to the other.
  acc_t* const h_buf[2] = {r.h->template data_ptr<acc_t>(), h_other.template data_ptr<acc_t>()};
  run_steps(r.d.D, r.d.B, r.d.H, r.steps, [&](int64_t dir, int64_t j0, int64_t j1, int64_t s) {
    const acc_t* h_in = h_buf[s % 2];
    product(dir, j0, j1, s, h_in);
    for (int64_t b = 0; b < B; ++b)
      r.template update<io_t>(kernel, s, dir, b, j0, j1, h_in, h_buf[(s + 1) % 2]);
  });
  if (r.steps % 2 == 1) r.h->copy_(h_other);
}

// A copy of h_{s-1} of a direction in the form a product reads, made once per step by each thread
// that needs it, into its own buffer ([threads, D, n] elements, with the step each holds).
template <typename T>
class StepCopies {
 public:
  StepCopies(int64_t D, int64_t n)
      : D_(D), n_(n), threads_(at::get_num_threads()), data_(threads_ * D * n),
        step_(threads_ * D, -1) {}

  // The copy for (dir, s), made by make(T* out) if this thread does not hold it yet.
  template <typename Make>
  const T* get(int64_t dir, int64_t s, const Make& make) {
    // at::parallel_for numbers its threads from 0 (0 when it runs inline, as inside a caller's
    // parallel region).
    const int64_t thread = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(thread < threads_, "thread ", thread, " of ", threads_);
    const int64_t slot = thread * D_ + dir;
    T* out = data_.data() + slot * n_;
    if (step_[slot] != s) {
      make(out);
      step_[slot] = s;
    }
    return out;
  }

 private:
  int64_t D_, n_, threads_;
  std::vector<T> data_;
  std::vector<int64_t> step_;
};

// Whether the float32 forward product runs with the batch in the vector lanes (else the row
// tiles): from kBtRows rows where padding the batch to a multiple of kBtRows adds at most an
// eighth (a padded row costs as much as a real one), for H a multiple of kBtColumns.
template <typename acc_t>
bool use_bt(const LstmCellKernels<acc_t>& kernels, int64_t B, int64_t H) {
  return kernels.recurrent_product_bt != nullptr && B >= kBtRows && bt_ldb(B) * 7 <= B * 8 &&
         H % kBtColumns == 0;
}

// w_hh (per direction [4H, H] float32) -> its groups of kBtColumns gate columns packed for
// recurrent_product_bt: [D, 4H / kBtColumns, kBtColumns * H].
at::Tensor pack_w_hh_bt(const DirectionWeights& w_hh, PackBtFn pack_group) {
  const int64_t D = static_cast<int64_t>(w_hh.size()), G = w_hh[0].size(0), H = w_hh[0].size(1);
  const int64_t groups = G / kBtColumns;
  auto packed = at::empty({D, groups, kBtColumns * H}, w_hh[0].options());
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, D * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q)
      pack_group(w_hh[q / groups].const_data_ptr<float>() + q % groups * kBtColumns * H, H,
                 dst + q * kBtColumns * H);
  });
  return packed;
}

void forward_packed_bt(ForwardRecurrence<float>& r) {
  const int64_t B = r.d.B, D = r.d.D, H = r.d.H, G = 4 * H;
  const int64_t ldb = bt_ldb(B);
  const at::Tensor w_packed = pack_w_hh_bt(*r.w_hh, r.kernels.pack_bt_group);
  const float* wp = w_packed.const_data_ptr<float>();
  float* rp = r.rp;
  // The product reads h_{s-1} transposed: [H, ldb].
  StepCopies<float> h_t(D, H * ldb);
  forward_packed_steps<float, float>(r, r.kernels.forward, [&](int64_t dir, int64_t j0, int64_t j1,
                                                              int64_t s, const float* h_in) {
    const float* ht = h_t.get(dir, s, [&](float* out) {
      r.kernels.to_bt(h_in + dir * B * H, B, H, out, ldb);
    });
    for (int64_t g = 0; g < 4; ++g)  // gate g's columns of this slice
      r.kernels.recurrent_product_bt(ht, ldb, wp + dir * G * H, rp + dir * B * G, B, H, G,
                                     g * H + j0, g * H + j1);
  });
}

template <typename acc_t>
void forward_packed(ForwardRecurrence<acc_t>& r) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_bt(r.kernels, r.d.B, r.d.H)) return forward_packed_bt(r);
  }
  const int64_t B = r.d.B, H = r.d.H, G = 4 * H;
  const at::Tensor w_packed = pack_w_hh<acc_t>(*r.w_hh, /*forward=*/true);
  const acc_t* wp = w_packed.const_data_ptr<acc_t>();
  acc_t* rp = r.rp;
  const std::vector<acc_t> zeros(H, acc_t(0));
  forward_packed_steps<acc_t, acc_t>(r, r.kernels.forward, [&](int64_t dir, int64_t j0, int64_t j1,
                                                              int64_t, const acc_t* h_in) {
    for (int64_t g = 0; g < 4; ++g)  // gate g's columns of this slice
      r.kernels.recurrent_product(h_in + dir * B * H, wp + dir * G * H, rp + dir * B * G, B, H, G,
                                  g * H + j0, g * H + j1, zeros.data());
  });
}

// Whether the bfloat16 product runs on AMX tiles (else AVX512-BF16): where the CPU has them, from
// kAmxMinRows rows (below, a tile of mostly unused rows is slower than the vector product).
template <typename acc_t>
bool use_amx(const LstmCellKernels<acc_t>& kernels, int64_t B, int64_t H) {
  return kernels.recurrent_product_bf16_amx != nullptr && B >= kAmxMinRows &&
         H % kAmxColumnsJ == 0;
}

void forward_packed_bf16(ForwardRecurrence<float>& r) {
  const int64_t B = r.d.B, D = r.d.D, H = r.d.H, G = 4 * H;
  const RecurrentProductBf16Fn product = use_amx(r.kernels, B, H)
                                             ? r.kernels.recurrent_product_bf16_amx
                                             : r.kernels.recurrent_product_bf16;
  const at::Tensor w_packed = pack_w_hh_bf16(*r.w_hh);
  const auto* wp = reinterpret_cast<const uint16_t*>(w_packed.const_data_ptr<at::BFloat16>());
  float* rp = r.rp;
  // The product reads h_{s-1} rounded to bfloat16.
  StepCopies<uint16_t> h_bf16(D, B * H);
  forward_packed_steps<float, uint16_t>(r, r.kernels.forward_bf16, [&](int64_t dir, int64_t j0,
                                                                      int64_t j1, int64_t s,
                                                                      const float* h_in) {
    const uint16_t* hb = h_bf16.get(dir, s, [&](uint16_t* out) {
      r.kernels.to_bf16(h_in + dir * B * H, out, B * H);
    });
    for (int64_t g = 0; g < 4; ++g)
      product(hb, wp + dir * G * H, rp + dir * B * G, B, H, G, g * H + j0, g * H + j1);
  });
}

enum class Algorithm { kBmm, kPacked, kPackedBf16 };
constexpr const char* kAlgorithmNames[] = {"bmm", "packed", "packed-bf16"};

// The forward algorithms, by Algorithm (null: none for this acc_t).
template <typename acc_t>
using ForwardFn = void (*)(ForwardRecurrence<acc_t>&);
template <typename acc_t>
ForwardFn<acc_t> forward_fn(Algorithm algorithm) {
  if constexpr (std::is_same_v<acc_t, float>) {
    static constexpr ForwardFn<float> table[] = {&forward_bmm<float>, &forward_packed<float>,
                                                 &forward_packed_bf16};
    return table[static_cast<int>(algorithm)];
  } else {
    static constexpr ForwardFn<acc_t> table[] = {&forward_bmm<acc_t>, &forward_packed<acc_t>,
                                                 nullptr};
    return table[static_cast<int>(algorithm)];
  }
}

// The forward algorithm of a layer: packed-bf16 for bfloat16 layers with the bf16 products, else
// packed where the variant has a product kernel for H, else bmm.
template <typename acc_t>
Algorithm forward_algorithm(const LstmCellKernels<acc_t>& kernels, int64_t H, bool bf16_product) {
  if (bf16_product) return Algorithm::kPackedBf16;
  return use_rec_kernel(kernels.recurrent_product, H) ? Algorithm::kPacked : Algorithm::kBmm;
}

// Runs the forward recurrence of one layer: h, c hold h0, c0 and receive h_n, c_n; y, gates and
// cell (null when not training) receive every valid step. xproj, y, gates and cell are bfloat16
// when bf16_product, else acc_t.
template <typename acc_t>
void forward_recurrence(const LstmDims& d, const std::vector<int64_t>& L,
                        const std::vector<at::Tensor>& xproj,  // per direction [T*B, 4H]
                        const DirectionWeights& w_hh,  // [4H, H] each, bfloat16 with bf16_product
                        bool bf16_product,
                        at::Tensor& h,            // [D, B, H] acc_t
                        at::Tensor& c,            // [D, B, H] acc_t
                        at::Tensor& y,            // [T, B, D*H] (zeros on padding)
                        at::Tensor* gates,        // [T, B, D, 4H] or null
                        at::Tensor* cell) {       // [T, B, D, H] or null
  const auto io = bf16_product ? at::kBFloat16 : c.scalar_type();
  for (const auto& t : xproj)
    TORCH_INTERNAL_ASSERT(t.scalar_type() == io && t.is_contiguous() && t.size(1) == 4 * d.H);
  TORCH_INTERNAL_ASSERT(y.scalar_type() == io);
  auto rec = at::empty({d.D, d.B, 4 * d.H}, c.options());
  ForwardRecurrence<acc_t> r{d,
                             &L,
                             *std::max_element(L.begin(), L.end()),
                             &w_hh,
                             &h,
                             rec,
                             rec.data_ptr<acc_t>(),
                             c.data_ptr<acc_t>(),
                             {xproj[0].const_data_ptr(), xproj[d.D - 1].const_data_ptr()},
                             y.data_ptr(),
                             gates ? gates->data_ptr() : nullptr,
                             cell ? cell->data_ptr() : nullptr,
                             lstm_cell_kernels<acc_t>()};
  const Algorithm algorithm = forward_algorithm(r.kernels, d.H, bf16_product);
  const ForwardFn<acc_t> run = forward_fn<acc_t>(algorithm);
  TORCH_INTERNAL_ASSERT(run != nullptr, "no ", kAlgorithmNames[static_cast<int>(algorithm)],
                        " forward for this dtype");
  record_kernel("cpu:lstm_forward:",
                algorithm == Algorithm::kPackedBf16
                    ? (use_amx(r.kernels, d.B, d.H) ? "bf16-amx" : "bf16-avx512")
                : algorithm == Algorithm::kPacked
                    ? (use_bt(r.kernels, d.B, d.H) ? "avx512-batch" : r.kernels.product_isa)
                                                    : "bmm",
                ":cell-", r.kernels.cell_isa);
  run(r);
}

// --- backward -----------------------------------------------------------------------------------

// One backward recurrence (reverse time): its operands and the cell backward that every
// algorithm runs. io_t is the type of the [T, B, ...] tensors: acc_t, or bfloat16 bits.
template <typename acc_t>
struct BackwardRecurrence {
  LstmDims d;
  const std::vector<int64_t>* L;  // [B] lengths
  int64_t steps;                  // the longest length
  const DirectionWeights* w_hh;   // per direction [4H, H] acc_t
  at::Tensor* dh;                 // [D, B, H] acc_t: grad_h_n in, grad_h0 out
  acc_t* dhp;                     // dh's data
  acc_t* dc;                      // [D, B, H]: grad_c_n in, grad_c0 out
  at::Tensor dh_rec;              // [D, B, H] acc_t: dG_{s+1} . w_hh, reaching h_s
  acc_t* drp;                     // dh_rec's data
  at::Tensor dG_step;             // [D, B, 4H] acc_t: one step's gate gradients
  const void* grad_y;             // [T, B, D*H] io
  const void* gates;              // [T, B, D, 4H] io
  const void* cell;               // [T, B, D, H] io
  const void* c0;                 // [D, B, H] io
  void* dG;                       // [T, B, D, 4H] io: gate gradients (zeros on padding)
  bool bf16_io;                   // io is bfloat16 (float32 acc_t only)
  LstmCellKernels<acc_t> kernels;

  // Cell backward of units [j0, j1) of row (dir, b) at step s, writing its gate gradients to ds,
  // with kernel(g_row, c_row, cprev_row, gy_row, dh_in, dc_row, ds_row, dG_row, n, H) on io_t
  // tensors.
  template <typename io_t, typename Kernel>
  void update(Kernel kernel, int64_t s, int64_t dir, int64_t b, int64_t j0, int64_t j1,
              acc_t* ds) const {
    const int64_t B = d.B, D = d.D, H = d.H, G = 4 * H;
    const int64_t row = dir * B + b, len = (*L)[b];
    acc_t* ds_row = ds + row * G;
    if (s >= len) {
      for (int64_t g = 0; g < 4; ++g) std::fill(ds_row + g * H + j0, ds_row + g * H + j1, acc_t(0));
      return;
    }
    const int64_t t = time_index(dir, s, len), at_t = (t * B + b) * D + dir;
    const io_t* cl = static_cast<const io_t*>(cell);
    // The first step processed for b takes grad_h_n; later ones the recurrent gradient.
    const acc_t* dh_in = (s + 1 < len) ? drp + row * H : dhp + row * H;
    const io_t* cprev_row = s == 0 ? static_cast<const io_t*>(c0) + row * H
                                   : cl + ((time_index(dir, s - 1, len) * B + b) * D + dir) * H;
    kernel(static_cast<const io_t*>(gates) + at_t * G + j0, cl + at_t * H + j0, cprev_row + j0,
           static_cast<const io_t*>(grad_y) + (t * B + b) * D * H + dir * H + j0, dh_in + j0,
           dc + row * H + j0, ds_row + j0, static_cast<io_t*>(dG) + at_t * G + j0, j1 - j0, H);
  }

  // The cell backward in the io type of this call.
  void update(int64_t s, int64_t dir, int64_t b, int64_t j0, int64_t j1, acc_t* ds) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (bf16_io) return update<uint16_t>(kernels.backward_bf16, s, dir, b, j0, j1, ds);
    }
    update<acc_t>(kernels.backward, s, dir, b, j0, j1, ds);
  }
};

template <typename acc_t>
void backward_bmm(BackwardRecurrence<acc_t>& r) {
  TORCH_INTERNAL_ASSERT(!r.bf16_io, "the bfloat16 products need the recurrent kernels");
  const int64_t B = r.d.B, D = r.d.D, H = r.d.H;
  acc_t* dsp = r.dG_step.template data_ptr<acc_t>();
  const auto w_hh = at::stack(*r.w_hh);  // [D, 4H, H], a copy for bmm
  for (int64_t s = r.steps - 1; s >= 0; --s) {
    at::parallel_for(0, D * B, rows_per_task(H), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) r.update(s, row / B, row % B, 0, H, dsp);
    });
    at::bmm_out(r.dh_rec, r.dG_step, w_hh);
  }
  r.dh->copy_(r.dh_rec);  // step 0 is valid for every sequence: dh_rec holds grad_h0 for all rows
}

template <typename acc_t>
void backward_packed(BackwardRecurrence<acc_t>& r) {
  const int64_t B = r.d.B, D = r.d.D, H = r.d.H, G = 4 * H;
  const at::Tensor w_packed = pack_w_hh<acc_t>(*r.w_hh, /*forward=*/false);
  const acc_t* wp = w_packed.data_ptr<acc_t>();
  const std::vector<acc_t> zeros(G, acc_t(0));
  auto dG_other = at::zeros({D, B, G}, r.dG_step.options());
  // The k-th step back (s = steps - 1 - k) reads dG_{s+1} from buffer k % 2 and writes dG_s to
  // the other; a last pass (k = steps) takes grad_h0 from dG_0.
  acc_t* const ds_buf[2] = {r.dG_step.template data_ptr<acc_t>(),
                            dG_other.template data_ptr<acc_t>()};
  acc_t* drp = r.drp;
  run_steps(D, B, H, r.steps + 1, [&](int64_t dir, int64_t j0, int64_t j1, int64_t k) {
    // Units [j0, j1) of dh_rec = dG_{s+1} . w_hh for direction dir; nothing flows back into the
    // last step, and step 0 is valid for every sequence (the last pass gives grad_h0 for all).
    if (k > 0)
      r.kernels.recurrent_product(ds_buf[k % 2] + dir * B * G, wp + dir * G * H,
                                  drp + dir * B * H, B, G, H, j0, j1, zeros.data());
    if (k < r.steps)
      for (int64_t b = 0; b < B; ++b) r.update(r.steps - 1 - k, dir, b, j0, j1, ds_buf[(k + 1) % 2]);
  });
  r.dh->copy_(r.dh_rec);
}

// The backward algorithms, by Algorithm (the bfloat16 backward runs packed with bfloat16 io).
template <typename acc_t>
using BackwardFn = void (*)(BackwardRecurrence<acc_t>&);
template <typename acc_t>
BackwardFn<acc_t> backward_fn(Algorithm algorithm) {
  static constexpr BackwardFn<acc_t> table[] = {&backward_bmm<acc_t>, &backward_packed<acc_t>,
                                                &backward_packed<acc_t>};
  return table[static_cast<int>(algorithm)];
}

// Runs the backward recurrence of one layer: dh, dc hold grad_h_n, grad_c_n and receive grad_h0,
// grad_c0; dG receives the pre-activation gate gradients of every valid step. grad_y, gates,
// cell, c0 and dG are bfloat16 when bf16_io, else acc_t.
template <typename acc_t>
void backward_recurrence(const LstmDims& d, const std::vector<int64_t>& L, bool bf16_io,
                         const at::Tensor& grad_y,  // [T, B, D*H]
                         const at::Tensor& gates,   // [T, B, D, 4H]
                         const at::Tensor& cell,    // [T, B, D, H]
                         const at::Tensor& c0,      // [D, B, H]
                         const DirectionWeights& w_hh,  // per direction [4H, H] acc_t
                         at::Tensor& dh,            // [D, B, H] acc_t
                         at::Tensor& dc,            // [D, B, H] acc_t
                         at::Tensor& dG) {          // [T, B, D, 4H] (zeros on padding)
  const auto io = dG.scalar_type();
  TORCH_INTERNAL_ASSERT(io == (bf16_io ? at::kBFloat16 : dh.scalar_type()) &&
                        grad_y.scalar_type() == io && gates.scalar_type() == io &&
                        cell.scalar_type() == io && c0.scalar_type() == io);
  auto dh_rec = at::zeros({d.D, d.B, d.H}, dh.options());
  BackwardRecurrence<acc_t> r{d,
                              &L,
                              *std::max_element(L.begin(), L.end()),
                              &w_hh,
                              &dh,
                              dh.data_ptr<acc_t>(),
                              dc.data_ptr<acc_t>(),
                              dh_rec,
                              dh_rec.data_ptr<acc_t>(),
                              at::zeros({d.D, d.B, 4 * d.H}, dh.options()),
                              grad_y.const_data_ptr(),
                              gates.const_data_ptr(),
                              cell.const_data_ptr(),
                              c0.const_data_ptr(),
                              dG.data_ptr(),
                              bf16_io,
                              lstm_cell_kernels<acc_t>()};
  const Algorithm algorithm = use_rec_kernel(r.kernels.recurrent_product, d.H) ? Algorithm::kPacked
                                                                               : Algorithm::kBmm;
  record_kernel("cpu:lstm_backward:",
                algorithm == Algorithm::kPacked ? r.kernels.product_isa : "bmm", ":cell-",
                r.kernels.cell_isa, bf16_io ? ":io-bf16" : "");
  backward_fn<acc_t>(algorithm)(r);
}

}  // namespace
}  // namespace cnnlstm_ext::lstm
