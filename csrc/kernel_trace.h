// Which kernel variant an op ran, for tests: while a trace is on (the kernel_trace op, through
// cnnlstm_ext.ops.recorded_kernels()), each launcher records the name of the variant it chose,
// e.g. "cuda:lstm_forward:persistent:fma:barrier" or "cpu:gemm:onednn". A test that forces a
// variant checks its name here, so that a silent fallback to another kernel fails the test.
// Off by default: one relaxed atomic load per launch decision, and the name (given in parts) is
// built only while a trace is on.
#pragma once
#include <atomic>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace cnnlstm_ext {

struct KernelTrace {
  std::atomic<bool> enabled{false};
  std::mutex mutex;
  std::vector<std::string> names;  // in the order recorded, repeats included
};

inline KernelTrace& kernel_trace_state() {
  static KernelTrace trace;
  return trace;
}

template <typename... Parts>
void record_kernel(const Parts&... parts) {
  auto& trace = kernel_trace_state();
  if (!trace.enabled.load(std::memory_order_relaxed)) return;
  std::string name;
  ((name += parts), ...);
  std::lock_guard<std::mutex> lock(trace.mutex);
  trace.names.push_back(std::move(name));
}

// enable=true: clears the record and starts recording; false: stops. Returns what was recorded
// since the last start.
inline std::vector<std::string> kernel_trace(bool enable) {
  auto& trace = kernel_trace_state();
  std::lock_guard<std::mutex> lock(trace.mutex);
  std::vector<std::string> names;
  names.swap(trace.names);
  trace.enabled.store(enable, std::memory_order_relaxed);
  return enable ? std::vector<std::string>() : names;
}

}  // namespace cnnlstm_ext
