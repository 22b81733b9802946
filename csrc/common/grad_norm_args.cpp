#include "common/grad_norm_args.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace dldna_fused {

namespace {

// One dtype (float32, bfloat16, float16) and one device, strided.
at::ScalarType check_tensors(const char* op, at::TensorList tensors) {
  const at::ScalarType dtype = tensors[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": tensors must be float32, bfloat16 or float16, got ", dtype);
  const at::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", i, "] must be dense, got layout ", t.layout());
    TORCH_CHECK(t.scalar_type() == dtype, op, ": tensors[", i, "] has dtype ", t.scalar_type(),
                " but tensors[0] has ", dtype, "; one call takes tensors of one dtype");
    TORCH_CHECK(t.device() == device, op, ": tensors[", i, "] is on ", t.device(), " but tensors[0] is on ",
                device, "; one call takes tensors of one device");
  }
  return dtype;
}

}  // namespace

at::ScalarType check_scale_args(at::TensorList tensors, const at::Tensor& factor) {
  constexpr const char* op = "dldna_fused::fused_scale_";
  TORCH_CHECK(factor.scalar_type() == at::kFloat && factor.numel() == 1, op,
              ": factor must be a float32 tensor of one element, got ", factor.scalar_type(), " with ",
              factor.numel(), " elements");
  if (tensors.empty()) {
    return at::kFloat;
  }
  const at::ScalarType dtype = check_tensors(op, tensors);
  TORCH_CHECK(factor.device() == tensors[0].device(), op, ": factor is on ", factor.device(),
              " but the tensors are on ", tensors[0].device());
  return dtype;
}

GradNormCall check_grad_norm_args(at::TensorList tensors, double norm_type,
                                  const std::optional<at::Tensor>& grad_scale) {
  constexpr const char* op = "dldna_fused::fused_grad_norm";
  cpu::NormKind kind = cpu::NormKind::L2;
  if (norm_type == 1.0) {
    kind = cpu::NormKind::L1;
  } else if (std::isinf(norm_type) && norm_type > 0) {
    kind = cpu::NormKind::Inf;
  } else {
    TORCH_CHECK(norm_type == 2.0, op, ": norm_type must be 1, 2 or inf, got ", norm_type,
                " (dldna_fused.clip_grad_norm_ computes other norms with torch)");
  }
  TORCH_CHECK(!tensors.empty(), op, ": tensors must not be empty (the norm of nothing is 0)");
  const at::ScalarType dtype = check_tensors(op, tensors);
  check_amp_tensors(op, grad_scale, std::nullopt, tensors[0].device());
  return {dtype, kind};
}

}  // namespace dldna_fused
