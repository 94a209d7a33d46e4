// Host-side preparation shared by the CPU and CUDA coefficient steps of Switchable Normalization.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "common/nc_layout.h"

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

// The kernels read C per-channel values; a shorter tensor would be read out of bounds (the Python front end
// checks too, but torch.compile and users call the ops directly).
inline void check_channel_vector(const c10::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->numel() == C, "switch_norm: ", name, " must have C = ", C, " elements, got shape ", t->sizes());
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
    check_channel_vector(weight, C, "weight");
    check_channel_vector(bias, C, "bias");
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

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "switch_norm: input must be (N, C, *), got ", input.sizes());
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "switch_norm backward: grad_output ", grad_output.sizes(),
              " does not match input ", input.sizes());
}

// (N, C, 2) per-plane statistics of `x` in its accumulation dtype, zero-initialised.
inline at::Tensor plane_stats_like(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "switch_norm: input must be (N, C, *), got ", x.sizes());
  return at::zeros({x.size(0), x.size(1), 2}, x.options().dtype(at::toOpMathType(x.scalar_type())));
}

// Operands of an elementwise pass out = k0 * a (+ k1 * b) + k_last, per-(n, c) coefficients k, all in one dense
// layout (that of `a` after to_nc_layout); `out` has that layout too.
struct PlaneAffineArgs {
  at::Tensor a, b, coefficients, out;
  NCLayout layout;

  PlaneAffineArgs(const at::Tensor& a_in, const at::Tensor* b_in, const at::Tensor& coefficients_in, int64_t width)
      : a(to_nc_layout(a_in)), b(b_in ? match_nc_layout(*b_in, a) : at::Tensor()), layout(nc_layout(a)) {
    TORCH_CHECK(coefficients_in.dim() == 3 && coefficients_in.size(0) == layout.N &&
                    coefficients_in.size(1) == layout.C && coefficients_in.size(2) == width,
                "switch_norm: coefficients must be (", layout.N, ", ", layout.C, ", ", width, "), got ",
                coefficients_in.sizes());
    coefficients = coefficients_in.to(at::toOpMathType(a.scalar_type())).contiguous();
    out = at::empty_like(a);
  }
};

// Everything the forward coefficient step reads and writes, prepared alike on every device.
struct ForwardCoefficientArgs {
  at::Tensor moments;  // (N, C, 2), contiguous
  Params params;
  bool bn_given;
  at::Tensor bn_used;       // (3, C): the given BN statistics, else filled from the batch
  at::Tensor coefficients;  // (N, C, 2) output

  ForwardCoefficientArgs(const at::Tensor& moments_in, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& mean_weight,
                         const at::Tensor& var_weight, const c10::optional<at::Tensor>& bn_stats, bool has_instance)
      : moments((check_coefficient_inputs(moments_in, mean_weight, var_weight, has_instance), moments_in.contiguous())),
        params(moments, weight, bias, mean_weight, var_weight) {
    const int64_t C = moments.size(1);
    const at::Tensor given = optional_as(bn_stats, moments);
    bn_given = given.defined();
    bn_used = bn_given ? given.clone() : at::zeros({3, C}, moments.options());
    TORCH_CHECK(bn_used.dim() == 2 && bn_used.size(0) == 3 && bn_used.size(1) == C,
                "switch_norm: bn_stats must be (3, ", C, "), got ", bn_used.sizes());
    coefficients = at::empty({moments.size(0), C, 2}, moments.options());
  }
};

// Inputs of the two backward coefficient steps, in the accumulation dtype and contiguous.
struct BackwardArgs {
  at::Tensor moments, grad_moments, bn_stats;
  at::Tensor bn_grad;  // undefined when the BN statistics are constants
  Params params;

  BackwardArgs(const at::Tensor& grad_moments_in, const at::Tensor& moments_in, const at::Tensor& bn_stats_in,
               const c10::optional<at::Tensor>& bn_grad_in, const c10::optional<at::Tensor>& weight,
               const at::Tensor& mean_weight, const at::Tensor& var_weight, bool has_instance)
      : moments((check_coefficient_inputs(moments_in, mean_weight, var_weight, has_instance), moments_in.contiguous())),
        grad_moments(grad_moments_in.to(moments.options()).contiguous()),
        bn_stats(bn_stats_in.to(moments.options()).contiguous()),
        bn_grad(optional_as(bn_grad_in, moments)),
        params(moments, weight, c10::nullopt, mean_weight, var_weight) {
    TORCH_CHECK(grad_moments.sizes() == moments.sizes(), "switch_norm backward: grad_moments ", grad_moments.sizes(),
                " does not match moments ", moments.sizes());
    TORCH_CHECK(bn_stats.dim() == 2 && bn_stats.size(0) == 3 && bn_stats.size(1) == C(),
                "switch_norm backward: bn_stats must be (3, ", C(), "), got ", bn_stats.sizes());
    TORCH_CHECK(!bn_grad.defined() || (bn_grad.dim() == 2 && bn_grad.size(0) == 2 && bn_grad.size(1) == C()),
                "switch_norm backward: bn_grad must be (2, ", C(), "), got ", bn_grad.sizes());
  }
  int64_t N() const { return moments.size(0); }
  int64_t C() const { return moments.size(1); }
};

}  // namespace switch_norm
}  // namespace normkit
