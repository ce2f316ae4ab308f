// Body of the LSTM cell kernels declared in lstm_cpu_cell.h. Included once per instruction set by a
// translation unit that first defines CNNLSTM_CELL_NS (the namespace of that variant) and, for a
// vector variant, the ATen CPU_CAPABILITY macros, so at::vec::Vectorized is that set's vector.
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>

#include "lstm/lstm_cpu_cell.h"

namespace cnnlstm_ext::lstm {
namespace CNNLSTM_CELL_NS {
namespace {

using at::vec::Vectorized;

// exp: Sleef's (1 ULP; float32 on AVX-512: exp_avx512, 1.3 ULP), or with kFast ATen's exp_u20
// (20 ULP, about 1e-6 relative), for the kernels whose outputs are rounded to bfloat16 (2^-8)
// anyway; it takes about half the time. exp_u20 turns a NaN into a number: NaNs are put back, so
// that they reach the outputs as in every other kernel (and nn.LSTM).
#ifdef CPU_CAPABILITY_AVX512
// float32 exp in registers, at most 1.3 ULP from exp (Sleef's: 1 ULP): Sleef's is a call, and
// the five per unit made the compiler spill the cell's live vectors around each (the cell
// update took about a fifth of a float32 B = 32 forward's recurrence). exp(x) = 2^n p(r) with
// n = round(x / ln 2), r = x - n ln 2 in two parts, p Cephes' expf polynomial; vscalefps
// applies 2^n with overflow to inf and gradual underflow. The clamp keeps NaN (min and max
// return their second operand when one is NaN).
inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(88.8f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

template <bool kFast, typename acc_t>
inline Vectorized<acc_t> vexp(Vectorized<acc_t> v) {
  if constexpr (kFast) {
    return Vectorized<acc_t>::blendv(v.exp_u20(), v, v.isnan());
  } else {
#ifdef CPU_CAPABILITY_AVX512
    if constexpr (std::is_same_v<acc_t, float>) return exp_avx512(v);
#endif
    return v.exp();
  }
}

template <bool kFast = false, typename acc_t>
inline Vectorized<acc_t> vsigmoid(Vectorized<acc_t> v) {
  const Vectorized<acc_t> one(acc_t(1));
  return one / (one + vexp<kFast>(v.neg()));
}

// tanh(v) = 2 / (1 + exp(-2v)) - 1: one exp, where Sleef's tanh took most of the cell update's
// time. Its error is absolute, about the rounding of 1 (1e-7 in float32), which is what reaches
// h and c; the relative error grows only where tanh(v) is near 0.
template <bool kFast = false, typename acc_t>
inline Vectorized<acc_t> vtanh(Vectorized<acc_t> v) {
  const Vectorized<acc_t> one(acc_t(1)), two(acc_t(2)), minus_two(acc_t(-2));
  return two / (one + vexp<kFast>(v * minus_two)) - one;
}

template <typename acc_t>
inline acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + std::exp(-v));
}

// Loads and stores of the [T, B, ...] tensors a row reads and writes: acc_t itself, or bfloat16
// bits (forward_bf16, backward_bf16), converted to and from float32 on the way.
template <typename acc_t>
inline Vectorized<acc_t> load_io(const acc_t* p) {
  return Vectorized<acc_t>::loadu(p);
}
template <typename acc_t>
inline void store_io(Vectorized<acc_t> v, acc_t* p) {
  v.store(p);
}
template <typename acc_t>
inline acc_t scalar_in(acc_t v) {
  return v;
}
template <typename acc_t>
inline void scalar_out(acc_t v, acc_t* p) {
  *p = v;
}
inline float scalar_in(uint16_t bits) { return c10::BFloat16(bits, c10::BFloat16::from_bits()); }
inline void scalar_out(float v, uint16_t* p) { *p = c10::BFloat16(v).x; }

#ifdef CPU_CAPABILITY_AVX2
// 8 bfloat16 -> float32: the bits become the high half of each lane.
inline Vectorized<float> load_io(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
// 8 float32 -> bfloat16, rounded to nearest even and NaN to 0x7fc0, as c10::BFloat16.
inline void store_io(Vectorized<float> v, uint16_t* p) {
  const __m256 f = v;
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  r = _mm256_srli_epi32(r, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  // 32 -> 16 bits per lane: packus works within 128-bit halves, [r0-3 r0-3 | r4-7 r4-7]; then
  // quadwords 0 and 2.
  r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(r));
}
#endif

#ifdef CPU_CAPABILITY_AVX512
// 16 bfloat16 -> float32: the bits become the high half of each lane.
inline Vectorized<float> load_io(const uint16_t* p) {
  const __m512i wide =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// 16 float32 -> bfloat16, rounded to nearest even and NaN to 0x7fc0, as c10::BFloat16.
inline void store_io(Vectorized<float> v, uint16_t* p) {
  const __m512 f = v;
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  r = _mm512_srli_epi32(r, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
#endif

// io_t: acc_t, or bfloat16 bits (uint16_t; AVX2 and AVX-512 builds) for x_row, y_row, g_row and
// cl_row.
template <typename acc_t, typename io_t>
void forward_row(const io_t* x_row, const acc_t* r_row, acc_t* c_row, acc_t* h_row, io_t* y_row,
                 io_t* g_row, io_t* cl_row, int64_t n, int64_t H) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr bool kFast = !std::is_same_v<io_t, acc_t>;  // bfloat16 io
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    Vec i = vsigmoid<kFast>(load_io(x_row + j) + Vec::loadu(r_row + j));
    Vec f = vsigmoid<kFast>(load_io(x_row + H + j) + Vec::loadu(r_row + H + j));
    Vec g = vtanh<kFast>(load_io(x_row + 2 * H + j) + Vec::loadu(r_row + 2 * H + j));
    Vec o = vsigmoid<kFast>(load_io(x_row + 3 * H + j) + Vec::loadu(r_row + 3 * H + j));
    Vec cn = f * Vec::loadu(c_row + j) + i * g;
    Vec hn = o * vtanh<kFast>(cn);
    cn.store(c_row + j);
    hn.store(h_row + j);
    store_io(hn, y_row + j);
    if (g_row) {
      store_io(i, g_row + j);
      store_io(f, g_row + H + j);
      store_io(g, g_row + 2 * H + j);
      store_io(o, g_row + 3 * H + j);
      store_io(cn, cl_row + j);
    }
  }
  for (; j < n; ++j) {
    const acc_t i = sigmoid(scalar_in(x_row[j]) + r_row[j]);
    const acc_t f = sigmoid(scalar_in(x_row[H + j]) + r_row[H + j]);
    const acc_t g = std::tanh(scalar_in(x_row[2 * H + j]) + r_row[2 * H + j]);
    const acc_t o = sigmoid(scalar_in(x_row[3 * H + j]) + r_row[3 * H + j]);
    const acc_t cn = f * c_row[j] + i * g;
    const acc_t hn = o * std::tanh(cn);
    c_row[j] = cn;
    h_row[j] = hn;
    scalar_out(hn, y_row + j);
    if (g_row) {
      scalar_out(i, g_row + j);
      scalar_out(f, g_row + H + j);
      scalar_out(g, g_row + 2 * H + j);
      scalar_out(o, g_row + 3 * H + j);
      scalar_out(cn, cl_row + j);
    }
  }
}

// io_t: acc_t, or bfloat16 bits (uint16_t; AVX2 build) for g_row, c_row, cprev_row, gy_row and
// dG_row; the recurrent state (dh_in, dc_row, ds_row) is acc_t.
template <typename acc_t, typename io_t>
void backward_row(const io_t* g_row, const io_t* c_row, const io_t* cprev_row, const io_t* gy_row,
                  const acc_t* dh_in, acc_t* dc_row, acc_t* ds_row, io_t* dG_row, int64_t n,
                  int64_t H) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr bool kFast = !std::is_same_v<io_t, acc_t>;  // bfloat16 io
  const Vec one(acc_t(1));
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const Vec i = load_io(g_row + j), f = load_io(g_row + H + j);
    const Vec g = load_io(g_row + 2 * H + j), o = load_io(g_row + 3 * H + j);
    const Vec tc = vtanh<kFast>(load_io(c_row + j));
    const Vec dh = load_io(gy_row + j) + Vec::loadu(dh_in + j);
    const Vec dc = Vec::loadu(dc_row + j) + dh * o * (one - tc * tc);
    const Vec di = dc * g * i * (one - i);
    const Vec df = dc * load_io(cprev_row + j) * f * (one - f);
    const Vec dg = dc * i * (one - g * g);
    const Vec dout = dh * tc * o * (one - o);
    (dc * f).store(dc_row + j);
    di.store(ds_row + j);
    df.store(ds_row + H + j);
    dg.store(ds_row + 2 * H + j);
    dout.store(ds_row + 3 * H + j);
    store_io(di, dG_row + j);
    store_io(df, dG_row + H + j);
    store_io(dg, dG_row + 2 * H + j);
    store_io(dout, dG_row + 3 * H + j);
  }
  for (; j < n; ++j) {
    const acc_t i = scalar_in(g_row[j]), f = scalar_in(g_row[H + j]);
    const acc_t g = scalar_in(g_row[2 * H + j]), o = scalar_in(g_row[3 * H + j]);
    const acc_t tc = std::tanh(scalar_in(c_row[j]));
    const acc_t dh = scalar_in(gy_row[j]) + dh_in[j];
    const acc_t dc = dc_row[j] + dh * o * (acc_t(1) - tc * tc);
    const acc_t di = dc * g * i * (acc_t(1) - i);
    const acc_t df = dc * scalar_in(cprev_row[j]) * f * (acc_t(1) - f);
    const acc_t dg = dc * i * (acc_t(1) - g * g);
    const acc_t dout = dh * tc * o * (acc_t(1) - o);
    dc_row[j] = dc * f;
    ds_row[j] = di;
    ds_row[H + j] = df;
    ds_row[2 * H + j] = dg;
    ds_row[3 * H + j] = dout;
    scalar_out(di, dG_row + j);
    scalar_out(df, dG_row + H + j);
    scalar_out(dg, dG_row + 2 * H + j);
    scalar_out(dout, dG_row + 3 * H + j);
  }
}

#ifdef CPU_CAPABILITY_AVX2
// AVX2/FMA recurrent product (lstm_cpu_cell.h). MKL runs these small-M GEMMs ([8, 512] x [512, 2048]
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

// Transpose16Fn (lstm_cpu_cell.h): 8 x 8 blocks of words transposed in registers, where a scalar loop
// moved one word per load and store (w_hh is packed at every call: a one-step call of 3 layers at
// H = 512, B = 1, float32, took 3.7-4.4 ms here against 4.4-4.6). Only moves bits: the words may
// be float32 or pairs of bfloat16.
void transpose16_avx2(const uint32_t* src, int64_t ld, uint32_t* dst, int64_t cols) {
  for (int64_t k0 = 0; k0 < cols; k0 += 8) {
    for (int64_t i0 = 0; i0 < 16; i0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + (i0 + i) * ld + k0));
      // Pairs of rows interleaved, then quads, then the 128-bit halves: c[j] holds word k0 + j of
      // rows i0 .. i0 + 7.
      __m256 t[8], q[8];
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        q[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        q[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        q[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        q[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int j = 0; j < 4; ++j) {
        float* out = reinterpret_cast<float*>(dst + (k0 + j) * 16 + i0);
        _mm256_storeu_ps(out, _mm256_permute2f128_ps(q[j], q[j + 4], 0x20));
        _mm256_storeu_ps(out + 4 * 16, _mm256_permute2f128_ps(q[j], q[j + 4], 0x31));
      }
    }
  }
}
#endif  // CPU_CAPABILITY_AVX2

}  // namespace

#ifdef CPU_CAPABILITY_AVX2
LstmCellKernels<float> kernels_float() {
  LstmCellKernels<float> kernels{&forward_row<float, float>, &backward_row<float, float>,
                                 &recurrent_product_avx2};
  kernels.forward_bf16 = &forward_row<float, uint16_t>;
  kernels.backward_bf16 = &backward_row<float, uint16_t>;
  kernels.transpose16 = &transpose16_avx2;
  kernels.cell_isa = kernels.product_isa = "avx2";
  return kernels;
}
#elif defined(CPU_CAPABILITY_AVX512)
// The cell updates only: the products come from lstm_cpu_rec_avx512.cpp, the packing from the
// AVX2 build (lstm_cell_kernels).
LstmCellKernels<float> kernels_float() {
  LstmCellKernels<float> kernels{&forward_row<float, float>, &backward_row<float, float>};
  kernels.forward_bf16 = &forward_row<float, uint16_t>;
  kernels.backward_bf16 = &backward_row<float, uint16_t>;
  kernels.cell_isa = "avx512";
  return kernels;
}
#else
LstmCellKernels<float> kernels_float() {
  return {&forward_row<float, float>, &backward_row<float, float>};
}
#endif
LstmCellKernels<double> kernels_double() {
  LstmCellKernels<double> kernels{&forward_row<double, double>, &backward_row<double, double>};
#if defined(CPU_CAPABILITY_AVX2)
  kernels.cell_isa = "avx2";
#elif defined(CPU_CAPABILITY_AVX512)
  kernels.cell_isa = "avx512";
#endif
  return kernels;
}

}  // namespace CNNLSTM_CELL_NS
}  // namespace cnnlstm_ext::lstm
