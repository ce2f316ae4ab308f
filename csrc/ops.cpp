// Every schema of the library, in one place. Kernels register in csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cu (CUDA); autograd and fake (meta) kernels are attached in cnnlstm_ext/ops.py.
#include <torch/library.h>

#ifndef CNNLSTM_EXT_NO_PYTHON
#include <Python.h>

extern "C" {
// `import cnnlstm_ext._C` loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(cnnlstm_ext, m) {
  // One LSTM layer, D = 1 or 2 directions in one call (direction 1 runs in reverse time).
  //   x: [T, B, I]   w_ih: [D, 4H, I]   w_hh: [D, 4H, H]   bias: [D, 4H] (b_ih + b_hh) or None
  //   h0, c0: [D, B, H]   lengths: [B] int64 on x's device, 1 <= lengths[b] <= T, or None (all T)
  // Gate order i, f, g, o as in torch.nn.LSTM. Returns
  //   y: [T, B, D*H] (zero past each sequence's length)   h_n, c_n: [D, B, H]
  //   gates: [T, B, D, 4H] activated gates, cell: [T, B, D, H] cell states, both in the
  //   accumulation dtype (float32, or float64 for float64 inputs); empty when train=False.
  m.def("lstm_layer_forward(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor h0, "
        "Tensor c0, Tensor? lengths, bool train) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of lstm_layer_forward. grad_y: [T, B, D*H], grad_h_n, grad_c_n: [D, B, H].
  // Returns grad_x [T, B, I], grad_w_ih [D, 4H, I], grad_w_hh [D, 4H, H], grad_bias [D, 4H],
  // grad_h0 [D, B, H], grad_c0 [D, B, H].
  m.def("lstm_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, "
        "Tensor w_ih, Tensor w_hh, Tensor h0, Tensor c0, Tensor? lengths, Tensor y, "
        "Tensor gates, Tensor cell) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // POOLING SCHEMAS (frame_pool_*, temporal_pool_*) go below this line.
}
