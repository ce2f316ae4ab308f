// The CPU pooling kernels built for AVX2, FMA and F16C (pooling_cpu_kernels.h), used where the CPU
// has them. Raw intrinsics only: the 16-bit types are storage here, and every header is included
// before the pragma, so no inline function shared with other translation units is compiled for
// AVX2 (the linker could keep that copy for all callers); the templates below have internal
// linkage.
#include "pooling/pooling_cpu_kernels.h"

#ifdef CNNLSTM_EXT_X86_SIMD

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>  // before the pragma, with the compiler's own macros

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace cnnlstm_ext::pooling {
namespace isa_avx2 {
namespace {

// 8 elements from p as float32.
template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // the upper half of a float32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// The running maximum of 8 lanes, m, and the index of its element, mi, updated with v, whose
// elements have indices vi: where v is larger, or the first NaN, as replaces_max (where m is not
// NaN, !(v <= m) is v > m or v NaN).
inline void update_max8(__m256 v, __m256i vi, __m256& m, __m256i& mi) {
  const __m256 take = _mm256_and_ps(_mm256_cmp_ps(v, m, _CMP_NLE_UQ), _mm256_cmp_ps(m, m, _CMP_ORD_Q));
  m = _mm256_blendv_ps(m, v, take);
  mi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(mi), _mm256_castsi256_ps(vi), take));
}

// As the portable functions below. The running results stay in L1 while the rows stream through
// one at a time (holding column blocks in registers over all rows, or reading two rows at once,
// was slower).
template <typename T>
void sum_rows(const T* p, int64_t row_stride, int64_t rows, int64_t n, float* out) {
  const int64_t n_vec = n - n % 8;
  for (int64_t c = 0; c < n; ++c) out[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * row_stride;
    for (int64_t c = 0; c < n_vec; c += 8)
      _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_loadu_ps(out + c), load8(row + c)));
    for (int64_t c = n_vec; c < n; ++c) out[c] += static_cast<float>(row[c]);
  }
}

template <typename T>
void weighted_sum_rows(const T* p, int64_t row_stride, int64_t rows, const float* weight,
                                        int64_t n, float* out) {
  const int64_t n_vec = n - n % 8;
  for (int64_t c = 0; c < n; ++c) out[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * row_stride;
    const __m256 w = _mm256_set1_ps(weight[r]);
    for (int64_t c = 0; c < n_vec; c += 8)
      _mm256_storeu_ps(out + c, _mm256_fmadd_ps(w, load8(row + c), _mm256_loadu_ps(out + c)));
    for (int64_t c = n_vec; c < n; ++c) out[c] += weight[r] * static_cast<float>(row[c]);
  }
}

template <typename T>
void max_rows(const T* p, int64_t row_stride, int64_t rows, int64_t n, float* max_value,
                               int32_t* max_index) {
  const int64_t n_vec = n - n % 8;
  for (int64_t c = 0; c < n; ++c) {
    max_value[c] = static_cast<float>(p[c]);
    max_index[c] = 0;
  }
  for (int64_t r = 1; r < rows; ++r) {
    const T* row = p + r * row_stride;
    const __m256i ri = _mm256_set1_epi32(static_cast<int32_t>(r));
    for (int64_t c = 0; c < n_vec; c += 8) {
      __m256 m = _mm256_loadu_ps(max_value + c);
      __m256i mi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(max_index + c));
      update_max8(load8(row + c), ri, m, mi);
      _mm256_storeu_ps(max_value + c, m);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(max_index + c), mi);
    }
    for (int64_t c = n_vec; c < n; ++c) {
      const float v = static_cast<float>(row[c]);
      const bool take = replaces_max(v, max_value[c]);
      max_value[c] = take ? v : max_value[c];
      max_index[c] = take ? static_cast<int32_t>(r) : max_index[c];
    }
  }
}

template <typename T>
float dot(const T* p, const float* w, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains of FMAs in flight
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    acc0 = _mm256_fmadd_ps(load8(p + c), _mm256_loadu_ps(w + c), acc0);
    acc1 = _mm256_fmadd_ps(load8(p + c + 8), _mm256_loadu_ps(w + c + 8), acc1);
  }
  for (; c + 8 <= n; c += 8) acc0 = _mm256_fmadd_ps(load8(p + c), _mm256_loadu_ps(w + c), acc0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  float s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  for (; c < n; ++c) s += static_cast<float>(p[c]) * w[c];
  return s;
}

// [s(v0), s(v1), ..., s(v7)], s = the sum of a vector's 8 lanes.
inline __m256 lane_sums8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // u0 = [lanes 0-3 of v0..v3 | lanes 4-7 of v0..v3], u1 likewise for v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// The 8 partial sums of one plane p: [HW], HW >= 8.
template <typename in_t>
inline __m256 plane_sum8(const in_t* p, int64_t HW) {
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();  // two chains of adds in flight
  int64_t k = 0;
  for (; k + 16 <= HW; k += 16) {
    a = _mm256_add_ps(a, load8(p + k));
    b = _mm256_add_ps(b, load8(p + k + 8));
  }
  if (k + 8 <= HW) {
    a = _mm256_add_ps(a, load8(p + k));
    k += 8;
  }
  if (k < HW) {
    // The tail: the plane's last 8 elements, of which the first 8 - (HW - k) were added above.
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i first_new = _mm256_set1_epi32(static_cast<int>(7 - (HW - k)));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, first_new));
    b = _mm256_add_ps(b, _mm256_and_ps(load8(p + HW - 8), keep));
  }
  return _mm256_add_ps(a, b);
}

// frame: [C, h*w] (contiguous maps); m: [C] float32 receives the sums of its planes, 8 planes at
// a time (their partial sums added across lanes together).
template <typename in_t>
void frame_sum_contiguous(const in_t* frame, int64_t HW, int64_t C, float* m) {
  if (HW < 8) {  // planes shorter than a vector: scalar sums, the frame read in order
    for (int64_t c = 0; c < C; ++c) {
      float sum = 0.f;
      for (int64_t k = 0; k < HW; ++k) sum += static_cast<float>(frame[c * HW + k]);
      m[c] = sum;
    }
    return;
  }
  __m256 v[8];
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    for (int j = 0; j < 8; ++j) v[j] = plane_sum8(frame + (c + j) * HW, HW);
    _mm256_storeu_ps(m + c, lane_sums8(v));
  }
  for (int j = 0; j < 8; ++j) v[j] = c + j < C ? plane_sum8(frame + (c + j) * HW, HW) : _mm256_setzero_ps();
  alignas(32) float sums[8];
  _mm256_store_ps(sums, lane_sums8(v));
  for (int j = 0; c + j < C; ++j) m[c + j] = sums[j];
}

// r[l] := lane l of the old r[0], ..., r[7] (an 8 x 8 transpose).
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// frame: [C, h*w] (contiguous maps, h*w >= 8); m: [C] float32 and a: [C] int32 receive each
// plane's maximum and the index of its first occurrence. A plane reduces into 8 lanes, each
// keeping the first occurrence of its own maximum; then 8 planes at a time across lanes, after a
// transpose (lane j of every vector: plane j): the maximum, then its smallest index (and the value
// there: of +0 and -0, the first).
template <typename in_t>
void frame_max_contiguous(const in_t* frame, int64_t HW, int64_t C, float* m,
                                                int32_t* a) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t c = 0; c < C; c += 8) {
    const int64_t cn = std::min<int64_t>(8, C - c);
    __m256 mv[8], mi[8];  // mi: int32 indices, as float bits for the transpose
    for (int64_t j = 0; j < 8; ++j) {
      const in_t* p = frame + (c + std::min(j, cn - 1)) * HW;  // past C: the last plane again
      __m256 v = load8(p);
      __m256i vi = lane;
      int64_t k = 8;
      for (; k + 8 <= HW; k += 8)
        update_max8(load8(p + k), _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(k))), v, vi);
      // The tail: the plane's last 8 elements. Those already seen come again with their own
      // index, higher than any index their new lane has seen: each lane keeps a first occurrence.
      if (k < HW) {
        const __m256i tail = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(HW - 8)));
        update_max8(load8(p + HW - 8), tail, v, vi);
      }
      mv[j] = v;
      mi[j] = _mm256_castsi256_ps(vi);
    }
    transpose8(mv);
    transpose8(mi);
    __m256 best = mv[0];
    for (int l = 1; l < 8; ++l)  // NaN wins
      best = _mm256_blendv_ps(best, mv[l], _mm256_and_ps(_mm256_cmp_ps(mv[l], best, _CMP_NLE_UQ),
                                                          _mm256_cmp_ps(best, best, _CMP_ORD_Q)));
    const __m256 best_nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
    __m256 value = best;
    __m256i index = _mm256_set1_epi32(INT32_MAX);
    for (int l = 0; l < 8; ++l) {
      const __m256i li = _mm256_castps_si256(mi[l]);
      const __m256 holds = _mm256_or_ps(_mm256_cmp_ps(mv[l], best, _CMP_EQ_OQ),
                                        _mm256_and_ps(_mm256_cmp_ps(mv[l], mv[l], _CMP_UNORD_Q), best_nan));
      const __m256 earlier = _mm256_and_ps(holds, _mm256_castsi256_ps(_mm256_cmpgt_epi32(index, li)));
      value = _mm256_blendv_ps(value, mv[l], earlier);
      index = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(index), mi[l], earlier));
    }
    alignas(32) float values[8];
    alignas(32) int32_t indices[8];
    _mm256_store_ps(values, value);
    _mm256_store_si256(reinterpret_cast<__m256i*>(indices), index);
    for (int64_t j = 0; j < cn; ++j) {
      m[c + j] = values[j];
      a[c + j] = indices[j];
    }
  }
}

}  // namespace

template <typename T>
PoolingCpuKernels<T> kernels() {
  PoolingCpuKernels<T> k;
  k.sum_rows = &sum_rows<T>;
  k.weighted_sum_rows = &weighted_sum_rows<T>;
  k.max_rows = &max_rows<T>;
  k.dot = &dot<T>;
  k.frame_sum_contiguous = &frame_sum_contiguous<T>;
  k.frame_max_contiguous = &frame_max_contiguous<T>;
  k.isa = "avx2";
  return k;
}

template PoolingCpuKernels<float> kernels<float>();
template PoolingCpuKernels<c10::BFloat16> kernels<c10::BFloat16>();
template PoolingCpuKernels<c10::Half> kernels<c10::Half>();

}  // namespace isa_avx2
}  // namespace cnnlstm_ext::pooling

#pragma GCC pop_options

#endif  // CNNLSTM_EXT_X86_SIMD
