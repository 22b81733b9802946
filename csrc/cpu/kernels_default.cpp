// The portable build of the CPU kernels. See [Note: CPU capability builds] in cpu/kernel_table.h.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define DLDNA_KERNELS_NAMESPACE portable

#include "cpu/kernels_impl.h"

namespace dldna_fused::cpu {

const KernelTable& kernels_default() {
  return portable::table("default");
}

}  // namespace dldna_fused::cpu
