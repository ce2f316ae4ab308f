// What both autograd files (lstm/lstm_autograd.cpp, pooling/pooling_autograd.cpp) need: whether a
// call records a graph node, i.e. grad mode is on and some argument needs a gradient. When not,
// their kernels run the op below autograd directly, without a node or saved context (as
// torch.library.register_autograd does). Arguments: tensors (undefined ones are skipped),
// optional tensors and tensor lists.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace cnnlstm_ext {

inline bool needs_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

inline bool needs_grad(const std::optional<at::Tensor>& t) { return t && needs_grad(*t); }

inline bool needs_grad(at::TensorList ts) {
  for (const auto& t : ts) {
    if (needs_grad(t)) return true;
  }
  return false;
}

template <typename... Args>
bool records_graph(const Args&... args) {
  return at::GradMode::is_enabled() && (needs_grad(args) || ...);
}

}  // namespace cnnlstm_ext
