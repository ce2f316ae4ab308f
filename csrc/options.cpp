// The options struct (options.h): one copy, read by the launchers under a lock (a few tens of
// nanoseconds per call), replaced whole by set_options.
#include "options.h"

#include <c10/util/Exception.h>

#include <mutex>

namespace cnnlstm_ext {
namespace {

std::mutex& options_mutex() {
  static std::mutex mutex;
  return mutex;
}

Options& current_options() {
  static Options options;
  return options;
}

}  // namespace

Options options() {
  std::lock_guard<std::mutex> lock(options_mutex());
  return current_options();
}

void set_options(const std::string& lstm_path, bool lstm_mma, const std::string& lstm_exchange,
                 int64_t persistent_max_batch, int64_t persistent_min_hb,
                 const std::string& frame_pool_kernel, const std::string& cpu_gemm) {
  Options o;
  TORCH_CHECK_VALUE(lstm_path == "auto" || lstm_path == "persistent" || lstm_path == "stepwise",
                    "lstm path must be auto, persistent or stepwise, got '", lstm_path, "'");
  o.lstm_path = lstm_path == "persistent" ? LstmPath::kPersistent
                : lstm_path == "stepwise" ? LstmPath::kStepwise
                                          : LstmPath::kAuto;
  o.lstm_mma = lstm_mma;
  TORCH_CHECK_VALUE(lstm_exchange == "barrier" || lstm_exchange == "tagged",
                    "lstm exchange must be barrier or tagged, got '", lstm_exchange, "'");
  o.lstm_exchange = lstm_exchange == "tagged" ? LstmExchange::kTagged : LstmExchange::kBarrier;
  TORCH_CHECK_VALUE(persistent_max_batch >= 0, "persistent_max_batch must be >= 0, got ",
                    persistent_max_batch);
  TORCH_CHECK_VALUE(persistent_min_hb >= 0, "persistent_min_hb must be >= 0, got ",
                    persistent_min_hb);
  o.persistent_max_batch = persistent_max_batch;
  o.persistent_min_hb = persistent_min_hb;
  TORCH_CHECK_VALUE(frame_pool_kernel == "pipelined" || frame_pool_kernel == "tile",
                    "frame_pool kernel must be pipelined or tile, got '", frame_pool_kernel, "'");
  o.frame_pool_kernel =
      frame_pool_kernel == "tile" ? FramePoolKernel::kTile : FramePoolKernel::kPipelined;
  TORCH_CHECK_VALUE(cpu_gemm == "auto" || cpu_gemm == "aten" || cpu_gemm == "onednn",
                    "cpu gemm must be auto, aten or onednn, got '", cpu_gemm, "'");
  o.cpu_gemm = cpu_gemm == "onednn" ? CpuGemm::kOneDnn
               : cpu_gemm == "aten" ? CpuGemm::kAten
                                    : CpuGemm::kAuto;
  std::lock_guard<std::mutex> lock(options_mutex());
  current_options() = o;
}

}  // namespace cnnlstm_ext
