// LSTM cell kernels for the baseline instruction set (every CPU), and the run-time choice of
// variant.
#define CNNLSTM_CELL_NS isa_default
#include "lstm/lstm_cpu_cell_impl.h"

namespace cnnlstm_ext::lstm {

template <>
LstmCellKernels<float> lstm_cell_kernels<float>() {
#ifdef CNNLSTM_EXT_X86_SIMD
  if (cpu_has_avx2()) {
    auto kernels = isa_avx2::kernels_float();
    if (cpu_has_avx512()) {
      const auto cell = isa_avx512::kernels_float();  // 16 lanes where AVX2 has 8
      kernels.forward = cell.forward;
      kernels.backward = cell.backward;
      kernels.forward_bf16 = cell.forward_bf16;
      kernels.backward_bf16 = cell.backward_bf16;
      kernels.cell_isa = cell.cell_isa;
      kernels.recurrent_product = &isa_avx512::recurrent_product;
      kernels.product_isa = "avx512";
      kernels.recurrent_product_bt = &isa_avx512::recurrent_product_bt;
      kernels.to_bt = &isa_avx512::to_bt;
      kernels.pack_bt_group = &isa_avx512::pack_bt_group;
    }
    if (cpu_has_avx512_bf16()) {
      kernels.recurrent_product_bf16 = &isa_avx512::recurrent_product_bf16;
      kernels.to_bf16 = &isa_avx512::to_bf16;
    }
    if (cpu_has_amx_bf16()) kernels.recurrent_product_bf16_amx = &isa_amx::recurrent_product_bf16;
    return kernels;
  }
#endif
  return isa_default::kernels_float();
}

template <>
LstmCellKernels<double> lstm_cell_kernels<double>() {
#ifdef CNNLSTM_EXT_X86_SIMD
  if (cpu_has_avx2()) return isa_avx2::kernels_double();
#endif
  return isa_default::kernels_double();
}

}  // namespace cnnlstm_ext::lstm
