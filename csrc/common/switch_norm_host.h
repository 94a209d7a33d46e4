// Host-side preparation shared by the CPU and CUDA coefficient steps of Switchable Normalization.
#pragma once

#include <ATen/ATen.h>

namespace normkit {
namespace switch_norm {

inline void check_coefficient_inputs(const at::Tensor& moments, const at::Tensor& mean_weight,
                                     const at::Tensor& var_weight, bool has_instance) {
  TORCH_CHECK(moments.dim() == 3 && moments.size(2) == 2, "switch_norm: moments must be (N, C, 2), got ",
              moments.sizes());
  TORCH_CHECK(mean_weight.numel() == var_weight.numel(), "switch_norm: mean_weight and var_weight lengths differ");
  const int64_t K = mean_weight.numel();
  TORCH_CHECK(has_instance ? (K == 2 || K == 3) : (K == 1 || K == 2), "switch_norm: expected ",
              has_instance ? "2 or 3" : "1 or 2", " mixture weights, got ", K);
}

// Affine parameters and mixture logits in the accumulation dtype of `moments`, contiguous, on its device;
// absent weight/bias become ones/zeros.
struct Params {
  at::Tensor gamma, beta, mean_logits, var_logits;
  int K;

  Params(const at::Tensor& moments, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
         const at::Tensor& mean_weight, const at::Tensor& var_weight) {
    const auto opts = moments.options();
    const int64_t C = moments.size(1);
    gamma = weight.has_value() && weight->defined() ? weight->to(opts).contiguous() : at::ones({C}, opts);
    beta = bias.has_value() && bias->defined() ? bias->to(opts).contiguous() : at::zeros({C}, opts);
    mean_logits = mean_weight.to(opts).contiguous();
    var_logits = var_weight.to(opts).contiguous();
    K = static_cast<int>(mean_weight.numel());
  }
};

inline at::Tensor optional_as(const c10::optional<at::Tensor>& t, const at::Tensor& like) {
  return t.has_value() && t->defined() ? t->to(like.options()).contiguous() : at::Tensor();
}

}  // namespace switch_norm
}  // namespace normkit
