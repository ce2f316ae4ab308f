// frame_pool_forward / frame_pool_backward on CUDA.
//
// Forward: x: [N, C, h, w] (N = B*T, frame n = b*T + t) -> out: [T, B, C] (or [B, T, C]) in one
// pass: each input byte is read once, each output element written once, in its final row and dtype.
//   contiguous maps, planes up to a few KB: tiles of channels. A block copies the contiguous
//     [channels, h*w] slab of one frame into shared memory with 16-byte loads, then each thread
//     reduces one plane from shared memory (the slab's planes are not 16-byte aligned, so this is
//     how the loads stay wide and coalesced). frame_pool_pipelined_kernel (the default where the
//     slabs are whole 16-byte vectors) runs the tiles on a persistent grid whose blocks copy their
//     next tile (cp.async) while reducing the current; frame_pool_tile_kernel, one block per tile,
//     runs the other shapes, or every shape with backends.frame_pool.kernel = "tile".
//   contiguous maps, larger planes: frame_pool_plane_kernel, one warp per plane.
//   channels_last maps: frame_pool_channels_last_kernel. Threads own 16 bytes of channels and walk
//     the h*w rows (split over threadIdx.y, combined in shared memory in a fixed order).
// Backward: grad_x written once with 16-byte stores, each element computed from its plane's gradient
// (and arg-max). No atomics anywhere: results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "kernel_trace.h"
#include "options.h"
#include "pooling/pooling_cuda_memory.cuh"
#include "pooling/pooling.h"

namespace cnnlstm_ext::pooling {
namespace {


struct FrameParams {
  int64_t N, C, HW, B, T;
  bool batch_first;
  Dtype out_dtype;  // forward: dtype of out; backward: dtype of grad_out
  // Row of out: [T, B, C] (or [B, T, C]) that frame n = b*T + t fills.
  __device__ __forceinline__ int64_t out_row(int64_t n) const {
    return batch_first ? n : (n % T) * B + n / T;
  }
};

constexpr int kTileThreads = 128;
constexpr int64_t kTileMaxChannels = 128;
constexpr int64_t kTileBytes = 24 * 1024;  // a few blocks per SM stay resident
static_assert(2 * kTileBytes <= 48 * 1024, "the pipelined kernel's two stages need no opt-in");
constexpr int kPlaneWarps = 8;
constexpr int kBackwardThreads = 256;

// Reduces the planes of one tile held in shared memory, tile: [cn, HW] of T, the channels
// [c0, c0 + cn) of frame n: one thread per plane, writing out (and argmax for max).
template <typename T, bool kMax>
__device__ __forceinline__ void reduce_tile_planes(const T* tile, int64_t n, int c0, int cn, int HW,
                                                   const FrameParams& p, void* out, int32_t* argmax) {
  using A = acc_t<T>;
  for (int j = threadIdx.x; j < cn; j += blockDim.x) {
    const T* plane = tile + j * HW;
    // Each thread starts at its own offset: planes whose size is a multiple of the bank count
    // would otherwise put every thread of a warp on the same bank.
    int k = j % HW;
    const int64_t o = p.out_row(n) * p.C + c0 + j;
    if constexpr (!kMax) {
      A s = 0;
      for (int step = 0; step < HW; ++step) {
        s += to_acc(plane[k]);
        k = k + 1 == HW ? 0 : k + 1;
      }
      store_as<A>(out, o, s / static_cast<A>(HW), p.out_dtype);
    } else {
      A m = to_acc(plane[k]);
      int mi = k;
      for (int step = 1; step < HW; ++step) {
        k = k + 1 == HW ? 0 : k + 1;
        const A v = to_acc(plane[k]);
        if (precedes(v, k, m, mi)) {
          m = v;
          mi = k;
        }
      }
      store_as<A>(out, o, m, p.out_dtype);
      argmax[n * p.C + c0 + j] = mi;
    }
  }
}

// x: [N, C, HW] contiguous. Block = (frame n, channels [c0, c0 + cn)); smem: [cn, HW] of T.
template <typename T, bool kMax, bool kVecLoad>
__global__ void __launch_bounds__(kTileThreads)
    frame_pool_tile_kernel(const T* __restrict__ x, void* __restrict__ out, int32_t* __restrict__ argmax,
                           FrameParams p, int tile_channels, int tiles_per_frame) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* tile = reinterpret_cast<T*>(smem_raw);
  const int64_t n = blockIdx.x / tiles_per_frame;
  const int c0 = static_cast<int>(blockIdx.x % tiles_per_frame) * tile_channels;
  const int cn = min(tile_channels, static_cast<int>(p.C) - c0);
  const int HW = static_cast<int>(p.HW);
  const int count = cn * HW;
  const T* src = x + (n * p.C + c0) * p.HW;
  if constexpr (kVecLoad) {
    constexpr int V = kVec16<T>;
    // Unrolled so that each thread keeps several 16-byte loads in flight.
#pragma unroll 4
    for (int i = threadIdx.x; i < count / V; i += blockDim.x)
      store_pack<T, V>(tile + i * V, load_pack<T, V>(src + i * V));
  } else {
    for (int i = threadIdx.x; i < count; i += blockDim.x) tile[i] = src[i];
  }
  __syncthreads();
  reduce_tile_planes<T, kMax>(tile, n, c0, cn, HW, p, out, argmax);
}

// 16 bytes from global to shared memory without passing through registers (sm_80 and later;
// a plain copy before), complete for the issuing thread after cp_async_wait.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// x: [N, C, HW] contiguous, each tile's slab 16-byte aligned and a whole number of 16-byte
// vectors. The tiles of frame_pool_tile_kernel, on a persistent grid: block b reduces tiles b,
// b + gridDim.x, ... through two shared-memory stages [tile_channels, HW] of T, so that the
// copies of its next tile are in flight while it reduces the current one (the tile kernel's
// blocks load nothing while they reduce). Same reduction, same results, bit for bit.
template <typename T, bool kMax>
__global__ void __launch_bounds__(kTileThreads)
    frame_pool_pipelined_kernel(const T* __restrict__ x, void* __restrict__ out, int32_t* __restrict__ argmax,
                                FrameParams p, int tile_channels, int tiles_per_frame) {
  constexpr int V = kVec16<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int HW = static_cast<int>(p.HW);
  const int stage_elems = tile_channels * HW;
  T* const stages = reinterpret_cast<T*>(smem_raw);  // [2, tile_channels, HW]
  const int64_t tiles = p.N * tiles_per_frame;
  auto fetch = [&](int64_t t, T* dst) {  // every thread issues its share of tile t's copies
    const int64_t n = t / tiles_per_frame;
    const int c0 = static_cast<int>(t % tiles_per_frame) * tile_channels;
    const int vectors = min(tile_channels, static_cast<int>(p.C) - c0) * HW / V;
    const T* src = x + (n * p.C + c0) * p.HW;
    for (int i = threadIdx.x; i < vectors; i += blockDim.x) cp_async16(dst + i * V, src + i * V);
  };
  int64_t t = blockIdx.x;
  if (t < tiles) fetch(t, stages);
  cp_async_commit();
  for (int stage = 0; t < tiles; t += gridDim.x, stage ^= 1) {
    if (t + gridDim.x < tiles) fetch(t + gridDim.x, stages + (stage ^ 1) * stage_elems);
    cp_async_commit();   // one group per iteration, empty or not, so that the wait below counts right
    cp_async_wait<1>();  // this thread's copies of tile t have landed (only the next tile's pend)
    __syncthreads();     // and every thread's
    const int64_t n = t / tiles_per_frame;
    const int c0 = static_cast<int>(t % tiles_per_frame) * tile_channels;
    reduce_tile_planes<T, kMax>(stages + stage * stage_elems, n, c0,
                                min(tile_channels, static_cast<int>(p.C) - c0), HW, p, out, argmax);
    __syncthreads();  // the next iteration refills this stage
  }
  cp_async_wait<0>();
}

// x: [N, C, HW] contiguous, one warp per plane (planes too large for a shared-memory tile).
template <typename T, bool kMax>
__global__ void __launch_bounds__(kPlaneWarps * 32)
    frame_pool_plane_kernel(const T* __restrict__ x, void* __restrict__ out, int32_t* __restrict__ argmax,
                            FrameParams p) {
  using A = acc_t<T>;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * kPlaneWarps + threadIdx.x / 32;
  if (plane >= p.N * p.C) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const T* src = x + plane * p.HW;
  const int64_t n = plane / p.C, c = plane % p.C;
  const int64_t o = p.out_row(n) * p.C + c;
  if constexpr (!kMax) {
    A s = 0;
    for (int64_t k = lane; k < p.HW; k += 32) s += to_acc(src[k]);
    s = warp_sum(s);
    if (lane == 0) store_as<A>(out, o, s / static_cast<A>(p.HW), p.out_dtype);
  } else {
    A m = -INFINITY;
    int mi = kNoIndex;
    for (int k = lane; k < p.HW; k += 32) {
      const A v = to_acc(src[k]);
      if (precedes(v, k, m, mi)) {
        m = v;
        mi = k;
      }
    }
    warp_max_index(m, mi);
    if (lane == 0) {
      store_as<A>(out, o, m, p.out_dtype);
      argmax[plane] = mi;
    }
  }
}

// x: [N, HW, C] (channels_last). Block = (frame n, chunk of blockDim.x * V channels); thread
// (lane, split) owns V channels and the rows split, split + blockDim.y, ...
// smem: [blockDim.y, blockDim.x * V] partial results of A (and int32 indices for max).
template <typename T, bool kMax, int V>
__global__ void __launch_bounds__(256)
    frame_pool_channels_last_kernel(const T* __restrict__ x, void* __restrict__ out,
                                    int32_t* __restrict__ argmax, FrameParams p, int chunks_per_frame) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lanes = blockDim.x, splits = blockDim.y, lane = threadIdx.x, split = threadIdx.y;
  const int width = lanes * V;
  A* part = reinterpret_cast<A*>(smem_raw);                      // [splits, width]
  int* part_index = reinterpret_cast<int*>(part + splits * width);  // [splits, width] (max)
  const int64_t n = blockIdx.x / chunks_per_frame;
  const int64_t c = (static_cast<int64_t>(blockIdx.x % chunks_per_frame) * lanes + lane) * V;
  const bool active = c < p.C;
  A acc[V];
  int idx[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc[j] = kMax ? static_cast<A>(-INFINITY) : A(0);
    idx[j] = kNoIndex;
  }
  if (active) {
    const T* frame = x + n * p.HW * p.C + c;
#pragma unroll 4
    for (int s = split; s < p.HW; s += splits) {
      const Pack<T, V> v = load_pack<T, V>(frame + s * p.C);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A a = to_acc(v.v[j]);
        if constexpr (kMax) {
          if (precedes(a, s, acc[j], idx[j])) {
            acc[j] = a;
            idx[j] = s;
          }
        } else {
          acc[j] += a;
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    part[split * width + lane * V + j] = acc[j];
    if constexpr (kMax) part_index[split * width + lane * V + j] = idx[j];
  }
  __syncthreads();
  if (split != 0 || !active) return;
  const int64_t o = p.out_row(n) * p.C + c;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    A r = part[lane * V + j];
    int ri = kMax ? part_index[lane * V + j] : 0;
    for (int sp = 1; sp < splits; ++sp) {  // fixed order: deterministic
      const A v = part[sp * width + lane * V + j];
      if constexpr (kMax) {
        const int vi = part_index[sp * width + lane * V + j];
        if (precedes(v, vi, r, ri)) {
          r = v;
          ri = vi;
        }
      } else {
        r += v;
      }
    }
    if constexpr (kMax) {
      store_as<A>(out, o + j, r, p.out_dtype);
      argmax[n * p.C + c + j] = ri;
    } else {
      store_as<A>(out, o + j, r / static_cast<A>(p.HW), p.out_dtype);
    }
  }
}

// grad_x: [N, C, HW] (contiguous) or [N, HW, C] (channels_last), written once. Block = (frame n,
// chunk of blockDim.x * V elements of the frame's C*HW); each thread writes one V-element pack.
template <typename T, bool kMax, bool kChannelsLast, int V>
__global__ void __launch_bounds__(kBackwardThreads)
    frame_pool_backward_kernel(const void* __restrict__ grad_out, const int32_t* __restrict__ argmax,
                               T* __restrict__ grad_x, FrameParams p, int chunks_per_frame) {
  using A = acc_t<T>;
  const int64_t n = blockIdx.x / chunks_per_frame;
  const int frame_size = static_cast<int>(p.C * p.HW);
  const int e = (static_cast<int>(blockIdx.x % chunks_per_frame) * blockDim.x + threadIdx.x) * V;
  if (e >= frame_size) return;
  const int C = static_cast<int>(p.C), HW = static_cast<int>(p.HW);
  // (channel, spatial position) of element e of the frame, advanced element by element below.
  int c = kChannelsLast ? e % C : e / HW;
  int s = kChannelsLast ? e / C : e % HW;
  const int64_t row = p.out_row(n) * p.C;
  const int32_t* frame_argmax = kMax ? argmax + n * p.C : nullptr;
  Pack<T, V> v;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const A g = load_as<A>(grad_out, row + c, p.out_dtype);
    if constexpr (kMax) {
      // An index from anywhere but frame_pool_forward is refused, as ATen's scatter does.
      CUDA_KERNEL_ASSERT(frame_argmax[c] >= 0 && frame_argmax[c] < HW);
      v.v[j] = frame_argmax[c] == s ? static_cast<T>(g) : static_cast<T>(0);
    } else {
      v.v[j] = static_cast<T>(g / static_cast<A>(HW));
    }
    if constexpr (kChannelsLast) {
      if (++c == C) { c = 0; ++s; }
    } else {
      if (++s == HW) { s = 0; ++c; }
    }
  }
  store_pack<T, V>(grad_x + n * frame_size + e, v);
}

// cnnlstm_ext.backends.frame_pool.kernel (options.h): the kernel for contiguous maps whose planes
// fit a shared-memory tile: pipelined (default) or one block per tile. Same results, bit for bit.
// On ResNet-18 maps from 1024 frames (H200, benchmarks/RESULTS.md) the pipelined kernel averages
// float32 1.2x to 1.3x as fast, and bfloat16 at 4096 frames 1.2x; the maxima take about the same
// time either way.
bool want_pipelined_kernel() { return options().frame_pool_kernel == FramePoolKernel::kPipelined; }

// Blocks of the pipelined kernel: as many as stay resident on every SM, none more than tiles.
int64_t pipelined_grid(int64_t tiles, size_t smem) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t by_smem =
      static_cast<int64_t>(prop->sharedMemPerMultiprocessor / (smem + prop->reservedSharedMemPerBlock));
  const int64_t by_threads = prop->maxThreadsPerMultiProcessor / kTileThreads;
  const int64_t per_sm =
      std::max<int64_t>(1, std::min({by_smem, by_threads, int64_t(prop->maxBlocksPerMultiProcessor)}));
  return std::min<int64_t>(tiles, per_sm * prop->multiProcessorCount);
}

template <typename T, bool kMax>
void launch_frame_pool_forward(const T* x, void* out, int32_t* argmax, const FramePoolShape& s,
                               const FrameParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int V = kVec16<T>;
  const bool aligned = is_aligned_16(x);
  const bool pipelined = want_pipelined_kernel();
  if (!s.channels_last) {
    int64_t tile_channels = std::min<int64_t>(kTileMaxChannels, kTileBytes / (s.HW() * int64_t(sizeof(T))));
    tile_channels = tile_channels / 8 * 8;  // tiles start 16-byte aligned when C*HW allows it
    if (tile_channels >= 8) {
      if (s.C <= tile_channels) tile_channels = s.C;  // one tile per frame
      const int64_t tiles = (s.C + tile_channels - 1) / tile_channels;
      const int64_t blocks = s.N * tiles;
      TORCH_CHECK(blocks <= INT_MAX, "frame_pool: too many frames for one launch (", s.N, ")");
      const size_t smem = tile_channels * s.HW() * sizeof(T);
      if (aligned && (s.C * s.HW()) % V == 0 && pipelined) {
        // Two stages of at most kTileBytes each: within the 48 KB a block gets without opting in.
        const int64_t grid = pipelined_grid(blocks, 2 * smem);
        frame_pool_pipelined_kernel<T, kMax><<<static_cast<unsigned>(grid), kTileThreads, 2 * smem, stream>>>(
            x, out, argmax, p, static_cast<int>(tile_channels), static_cast<int>(tiles));
        record_kernel("cuda:frame_pool_forward:pipelined");
      } else if (aligned && (s.C * s.HW()) % V == 0) {
        frame_pool_tile_kernel<T, kMax, true><<<static_cast<unsigned>(blocks), kTileThreads, smem, stream>>>(
            x, out, argmax, p, static_cast<int>(tile_channels), static_cast<int>(tiles));
        record_kernel("cuda:frame_pool_forward:tile");
      } else {
        frame_pool_tile_kernel<T, kMax, false><<<static_cast<unsigned>(blocks), kTileThreads, smem, stream>>>(
            x, out, argmax, p, static_cast<int>(tile_channels), static_cast<int>(tiles));
        record_kernel("cuda:frame_pool_forward:tile-unaligned");
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t blocks = (s.N * s.C + kPlaneWarps - 1) / kPlaneWarps;
      TORCH_CHECK(blocks <= INT_MAX, "frame_pool: too many planes for one launch (", s.N * s.C, ")");
      frame_pool_plane_kernel<T, kMax><<<static_cast<unsigned>(blocks), kPlaneWarps * 32, 0, stream>>>(x, out, argmax, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      record_kernel("cuda:frame_pool_forward:plane");
    }
    return;
  }
  auto launch = [&](auto vec) {
    constexpr int W = decltype(vec)::value;
    const int64_t vectors = (s.C + W - 1) / W;
    const int lanes = static_cast<int>(std::min<int64_t>(vectors, 128));
    const int splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(s.HW(), 256 / lanes)));
    const int64_t chunks = (vectors + lanes - 1) / lanes;
    const int64_t blocks = s.N * chunks;
    TORCH_CHECK(blocks <= INT_MAX, "frame_pool: too many frames for one launch (", s.N, ")");
    const size_t smem = size_t(splits) * lanes * W * (sizeof(A) + (kMax ? sizeof(int) : 0));
    frame_pool_channels_last_kernel<T, kMax, W><<<static_cast<unsigned>(blocks), dim3(lanes, splits), smem, stream>>>(
        x, out, argmax, p, static_cast<int>(chunks));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    record_kernel("cuda:frame_pool_forward:channels_last");
  };
  if (aligned && s.C % V == 0) launch(std::integral_constant<int, V>());
  else launch(std::integral_constant<int, 1>());
}

template <typename T, bool kMax>
void launch_frame_pool_backward(const void* grad_out, const int32_t* argmax, T* grad_x,
                                const FramePoolShape& s, const FrameParams& p, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  const int64_t frame_size = s.C * s.HW();
  TORCH_CHECK(frame_size <= INT_MAX / 2, "frame_pool_backward: C*h*w = ", frame_size, " is too large");
  const bool vec = is_aligned_16(grad_x) && frame_size % V == 0 && (!s.channels_last || s.C % V == 0);
  auto launch = [&](auto vec_width, auto channels_last) {
    constexpr int W = decltype(vec_width)::value;
    constexpr bool kCL = decltype(channels_last)::value;
    const int64_t chunks = (frame_size / W + kBackwardThreads - 1) / kBackwardThreads;
    const int64_t blocks = s.N * chunks;
    TORCH_CHECK(blocks <= INT_MAX, "frame_pool_backward: too many frames for one launch (", s.N, ")");
    frame_pool_backward_kernel<T, kMax, kCL, W><<<static_cast<unsigned>(blocks), kBackwardThreads, 0, stream>>>(
        grad_out, argmax, grad_x, p, static_cast<int>(chunks));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using One = std::integral_constant<int, 1>;
  using Wide = std::integral_constant<int, V>;
  if (s.channels_last) {
    if (vec) launch(Wide(), std::true_type());
    else launch(One(), std::true_type());
  } else {
    if (vec) launch(Wide(), std::false_type());
    else launch(One(), std::false_type());
  }
}

std::tuple<at::Tensor, at::Tensor> frame_pool_forward_cuda(const at::Tensor& x, int64_t batch_size,
                                                           c10::string_view mode_name, bool batch_first,
                                                           std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x.is_cuda(), "frame_pool: x must be a CUDA tensor here, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const FramePoolCall call = pooling::frame_pool_call(x, batch_size, mode_name, batch_first, out_dtype);
  const FrameMode mode = call.mode;
  const FramePoolShape& s = call.s;
  const at::Tensor& xc = call.x;
  const at::ScalarType odt = call.out_dtype;
  at::Tensor out = call.out, argmax = call.argmax;
  if (xc.numel() == 0) return {out, argmax};
  TORCH_CHECK(s.HW() <= INT_MAX / 2 && s.C <= INT_MAX / 2, "frame_pool: h*w and C must be below 2^30");
  const FrameParams p{s.N, s.C, s.HW(), s.B, s.T, batch_first, to_dtype(odt)};
  int32_t* idx = mode == FrameMode::Max ? argmax.data_ptr<int32_t>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "frame_pool_forward", [&] {
    if (mode == FrameMode::Max)
      launch_frame_pool_forward<scalar_t, true>(xc.const_data_ptr<scalar_t>(), out.data_ptr(), idx, s, p,
                                                stream);
    else
      launch_frame_pool_forward<scalar_t, false>(xc.const_data_ptr<scalar_t>(), out.data_ptr(), idx, s, p,
                                                 stream);
  });
  return {out, argmax};
}

at::Tensor frame_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& argmax,
                                    at::IntArrayRef x_size, at::ScalarType x_dtype, bool channels_last,
                                    int64_t batch_size, c10::string_view mode_name, bool batch_first) {
  TORCH_CHECK(grad_out.is_cuda(), "frame_pool_backward: grad_out must be a CUDA tensor here, got ",
              grad_out.device());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const FramePoolBackwardCall call = pooling::frame_pool_backward_call(
      grad_out, argmax, x_size, x_dtype, channels_last, batch_size, mode_name, batch_first);
  const FrameMode mode = call.mode;
  const FramePoolShape& s = call.s;
  at::Tensor grad_x = call.grad_x;
  if (grad_x.numel() == 0) return grad_x;
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor idx = mode == FrameMode::Max ? argmax.contiguous() : argmax;
  const int32_t* idx_ptr = mode == FrameMode::Max ? idx.const_data_ptr<int32_t>() : nullptr;
  const FrameParams p{s.N, s.C, s.HW(), s.B, s.T, batch_first, to_dtype(g.scalar_type())};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_dtype, "frame_pool_backward", [&] {
    if (mode == FrameMode::Max)
      launch_frame_pool_backward<scalar_t, true>(g.const_data_ptr(), idx_ptr, grad_x.data_ptr<scalar_t>(),
                                                 s, p, stream);
    else
      launch_frame_pool_backward<scalar_t, false>(g.const_data_ptr(), idx_ptr, grad_x.data_ptr<scalar_t>(),
                                                  s, p, stream);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnlstm_ext, CUDA, m) {
  m.impl("frame_pool_forward", &frame_pool_forward_cuda);
  m.impl("frame_pool_backward", &frame_pool_backward_cuda);
}

}  // namespace cnnlstm_ext::pooling
