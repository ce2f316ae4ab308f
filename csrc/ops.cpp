// Every schema of the library, in one place. Each op's kernels register in its folder:
// csrc/lstm/, csrc/pooling/ and csrc/video/ hold the CPU kernels (*_cpu.cpp), the CUDA kernels
// (*_cuda.cu) and the autograd (*_autograd.cpp); fake (meta) kernels are attached in
// cnnlstm_ext/ops.py.
#include <torch/library.h>

#include "kernel_trace.h"
#include "options.h"

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
  //   x: [T, B, I]   weights: the layer's slice of nn.LSTM's flat weights, per direction
  //   w_ih [4H, I], w_hh [4H, H], then b_ih, b_hh [4H] if the layer has biases (2*D or 4*D
  //   tensors; directions stored back to back in one storage are read in place, others copied),
  //   in one floating dtype: cast to x's when it differs (float32 master weights under autocast)
  //   h0, c0: [D, B, H]   lengths: [B] int64 on x's device, 1 <= lengths[b] <= T, or None (all T)
  // Gate order i, f, g, o as in torch.nn.LSTM. Returns
  //   y: [T, B, D*H] (zero past each sequence's length)   h_n, c_n: [D, B, H]
  //   gates: [T, B, D, 4H] activated gates, cell: [T, B, D, H] cell states, both in x's dtype,
  //   saved for backward; empty when train=False.
  m.def("lstm_layer_forward(Tensor x, Tensor[] weights, Tensor h0, Tensor c0, Tensor? lengths, "
        "bool train) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of lstm_layer_forward. grad_y: [T, B, D*H], grad_h_n, grad_c_n: [D, B, H]; the
  // other arguments as given to and returned by the forward. Returns grad_x [T, B, I] (undefined,
  // None in Python, when need_grad_x is false: the first layer on inputs without a gradient, as
  // frozen-backbone features, skips that GEMM), and stacked over directions in the weights'
  // dtype grad_w_ih [D, 4H, I], grad_w_hh [D, 4H, H], grad_bias [D, 4H] (the gradient of b_ih
  // and of b_hh alike), then grad_h0, grad_c0 [D, B, H].
  m.def("lstm_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, "
        "Tensor[] weights, Tensor h0, Tensor c0, Tensor? lengths, Tensor y, Tensor gates, "
        "Tensor cell, bool need_grad_x=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One layer of an LSTM with projections (nn.LSTM's proj_size = P > 0), D = 1 or 2 directions:
  // h_t = w_hr (o_t * tanh(c_t)). weights per direction: w_ih [4H, I], w_hh [4H, P], then
  // b_ih, b_hh [4H] if the layer has biases, then w_hr [P, H]; h0: [D, B, P], c0: [D, B, H];
  // lengths as above. Returns y: [T, B, D*P], h_n: [D, B, P], c_n: [D, B, H]. Step by step in
  // ATen ops on every device (csrc/lstm/lstm_steps.cpp), differentiable through them.
  m.def("lstm_layer_projected(Tensor x, Tensor[] weights, Tensor h0, Tensor c0, Tensor? lengths) "
        "-> (Tensor, Tensor, Tensor)");
  // lstm_layer_projected as one node of a torch.export program, where the composite op's step
  // loop would fix T: the same kernel on the CPU and CUDA, a fake kernel and an autograd that
  // recomputes through lstm_layer_projected (cnnlstm_ext/ops.py).
  m.def("lstm_layer_projected_export(Tensor x, Tensor[] weights, Tensor h0, Tensor c0, "
        "Tensor? lengths) -> (Tensor, Tensor, Tensor)");
  // POOLING SCHEMAS (frame_pool_*, temporal_pool_*) go below this line.
  // Per-frame CNN feature maps -> frame features in the layout the LSTM consumes, in one pass.
  //   x: [N, C, h, w] with N = B*T frames in (b, t) order (frame n = b*T + t), contiguous or
  //   channels_last (other layouts are copied first); float32/float64/bfloat16/float16.
  //   mode: "avg" | "max". out_dtype: dtype of out (None: x's dtype).
  // Returns out: [T, B, C] ([B, T, C] when batch_first), and argmax: [N, C] int32, the spatial
  // index (i*w + j) of each maximum for mode "max" (first one on ties, NaN wins), empty for "avg".
  m.def("frame_pool_forward(Tensor x, int batch_size, str mode, bool batch_first, "
        "ScalarType? out_dtype) -> (Tensor out, Tensor argmax)");
  // Gradient of frame_pool_forward. grad_out: [T, B, C] ([B, T, C] when batch_first), argmax as
  // returned by the forward (empty for "avg"). Returns grad_x: x_size, dtype x_dtype, written once
  // (every element), in channels_last when channels_last is true.
  m.def("frame_pool_backward(Tensor grad_out, Tensor argmax, SymInt[] x_size, ScalarType x_dtype, "
        "bool channels_last, int batch_size, str mode, bool batch_first) -> Tensor");
  // LSTM outputs -> one vector per sequence, over the valid steps t < lengths[b] only.
  //   x: [T, B, D] ([B, T, D] when batch_first), last dimension contiguous.
  //   lengths: [B] int64 (CPU or x's device), 1 <= lengths[b] <= T, or None (all T); checked with
  //   a clear error (CUDA: by the forward, outside CUDA graph capture; the kernels clamp).
  //   mode: "mean" | "max" | "last" | "attention".
  //   "last" with bidirectional: features [0, D/2) from step lengths[b]-1 (forward direction),
  //   [D/2, D) from step 0 (reverse direction).
  //   "attention": softmax over valid t of x[t, b] . score_weight + score_bias, then the weighted
  //   sum. score_weight: [D] (or [1, D]), score_bias: [1] or None; any floating dtype.
  // Returns out: [B, D] in x's dtype, and aux: for "max" the time index of each maximum [B, D]
  // int32, for "attention" the attention weights [B, T] (float32; float64 for float64 x; zero
  // past each length), empty otherwise.
  m.def("temporal_pool_forward(Tensor x, Tensor? lengths, str mode, bool batch_first, "
        "bool bidirectional, Tensor? score_weight, Tensor? score_bias) -> (Tensor out, Tensor aux)");
  // Gradient of temporal_pool_forward. grad_out: [B, D]; x, lengths, aux as in the forward.
  // Returns grad_x (x's shape, dtype and layout [T, B, D] or [B, T, D], contiguous, zero on padding),
  // and for "attention" grad_score_weight (score_weight's shape and dtype) and grad_score_bias
  // ([1], score_bias's dtype, or empty when score_bias is None); empty tensors for other modes.
  m.def("temporal_pool_backward(Tensor grad_out, Tensor x, Tensor? lengths, Tensor aux, str mode, "
        "bool batch_first, bool bidirectional, Tensor? score_weight, Tensor? score_bias) "
        "-> (Tensor grad_x, Tensor grad_score_weight, Tensor grad_score_bias)");
  // A decoded planar YUV frame -> RGB at a smaller size (csrc/video/; CPU, as the decoder).
  //   y: [H, W] uint8; u, v: [Hc, Wc] uint8, each Hc = H or ceil(H / 2), Wc = W or ceil(W / 2)
  //   (4:4:4, 4:2:2, 4:2:0); rows may be padded (stride(0) >= columns), columns contiguous.
  //   height <= H, width <= W: each output pixel is the mean over the source area it covers.
  //   kr, kb: the matrix's luma coefficients (BT.601: 0.299, 0.114; BT.709: 0.2126, 0.0722);
  //   full_range: Y, U, V in [0, 255] (JPEG), else limited (Y in [16, 235], U, V in [16, 240]).
  // Returns [height, width, 3] uint8 RGB, rounded half up and clamped.
  m.def("yuv_to_rgb(Tensor y, Tensor u, Tensor v, int height, int width, float kr, float kb, "
        "bool full_range) -> Tensor");
  // For tests: enable=True clears the record of kernel variants and starts recording (returns
  // []); enable=False stops and returns the names recorded since (csrc/kernel_trace.h).
  m.def("kernel_trace(bool enable) -> str[]", &cnnlstm_ext::kernel_trace);
  // The run-time options of the kernels (csrc/options.h), all at once; cnnlstm_ext.backends
  // holds them on the Python side and calls this whenever one changes.
  m.def("set_options(str lstm_path, bool lstm_mma, str lstm_exchange, int persistent_max_batch, "
        "int persistent_min_hb, str frame_pool_kernel, str cpu_gemm) -> ()",
        &cnnlstm_ext::set_options);
}
