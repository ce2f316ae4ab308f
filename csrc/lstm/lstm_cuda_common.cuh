// Constants and math shared by the LSTM op's CUDA files (included by lstm_cuda.cu only).
#pragma once
#include <cstdint>

#include "lstm/lstm_cuda_math.cuh"

namespace cnnlstm_ext::lstm {
namespace {

constexpr int kThreads = 256;  // 8 warps per CTA on every path
constexpr int kRT = 4;         // weight rows per warp tile in the recurrent product

__host__ __device__ inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace
}  // namespace cnnlstm_ext::lstm
