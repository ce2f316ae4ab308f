// Run-time choices among kernel variants, in one struct that the launchers read. Set from Python
// through the set_options op by cnnlstm_ext.backends (attributes and flags(...), validated there
// and again here); the environment variables of that module are read once, at its import.
#pragma once
#include <cstdint>
#include <string>

namespace cnnlstm_ext {

enum class LstmPath : int8_t { kAuto, kPersistent, kStepwise };
enum class LstmExchange : int8_t { kBarrier, kTagged };
enum class FramePoolKernel : int8_t { kPipelined, kTile };
enum class CpuGemm : int8_t { kAuto, kOneDnn, kAten };

struct Options {
  // CUDA LSTM recurrence: auto (persistent up to persistent_max_batch, where a plan fits), or
  // forced; a forced persistent path that cannot plan is an error.
  LstmPath lstm_path = LstmPath::kAuto;
  bool lstm_mma = false;  // tensor-core recurrent product for 16-bit weights (persistent path)
  LstmExchange lstm_exchange = LstmExchange::kBarrier;  // how the persistent forward passes h
  int64_t persistent_max_batch = 32;  // the largest batch auto gives the persistent path
  int64_t persistent_min_hb = 0;      // the fewest hidden units per CTA of a persistent plan
  FramePoolKernel frame_pool_kernel = FramePoolKernel::kPipelined;  // CUDA, contiguous maps
  CpuGemm cpu_gemm = CpuGemm::kAuto;  // the CPU LSTM's large GEMMs: oneDNN where torch has it
};

// A snapshot of the options now in force.
Options options();

// The set_options op (schema in ops.cpp): every option at once, by name.
void set_options(const std::string& lstm_path, bool lstm_mma, const std::string& lstm_exchange,
                 int64_t persistent_max_batch, int64_t persistent_min_hb,
                 const std::string& frame_pool_kernel, const std::string& cpu_gemm);

}  // namespace cnnlstm_ext
