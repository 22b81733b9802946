#pragma once
// The table of every optimizer's CPU chunk kernels, compiled once per CPU capability by
// cpu/kernels_*.cpp. See [Note: CPU capability builds] in cpu/kernel_table.h. Must be included by
// those files only, each defining DLDNA_KERNELS_NAMESPACE (a namespace unique to the capability).
// The kernels live by optimizer in cpu/kernels_<name>.h.

#include "cpu/kernels_adafactor.h"
#include "cpu/kernels_adam.h"
#include "cpu/kernels_lion_sophia.h"
#include "cpu/kernels_lowbit.h"
#include "cpu/kernels_norm.h"

namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE {

inline const KernelTable& table(const char* name) {
  static const KernelTable kTable{name,
                                  &adam_chunks,
                                  &lion_chunks,
                                  &sophia_chunks,
                                  &sophia_hessian_chunks,
                                  &adafactor_reduce_units,
                                  &adafactor_update_norm_units,
                                  &adafactor_apply_units,
                                  &grad_norm_chunks,
                                  &scale_chunks,
                                  &adam_lowbit_chunks,
                                  &lion_lowbit_chunks,
                                  &quantize_chunks,
                                  &dequantize_chunks};
  return kTable;
}

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE
