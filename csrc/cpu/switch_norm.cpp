// Switchable Normalization, CPU kernels. Two streaming passes forward (moments, affine), two backward
// (gradient moments, affine backward), and O(N*C) coefficient steps between them whose arithmetic is shared with
// the CUDA kernels through common/switch_norm.h. The loops are in cpu/switch_norm_passes.inc and
// cpu/switch_norm_coefficients.inc, each built for the x86-64 baseline and for AVX2+FMA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/nc_layout.h"
#include "common/switch_norm.h"
#include "common/switch_norm_host.h"
#include "cpu/isa.h"

namespace normkit {
namespace {

using namespace switch_norm;

// ---------------------------------------------------------------------------------------------------------------
// Streaming passes, built for the x86-64 baseline and for AVX2+FMA; NORMKIT_BEST_ISA picks one at run time.

#define NORMKIT_ISA_SOURCE "cpu/switch_norm_passes.inc"
#include "cpu/isa_builds.h"

at::Tensor moments_cpu(const at::Tensor& input) {
  at::Tensor out = plane_stats_like(input);
  const at::Tensor x = to_nc_layout(input);
  const NCLayout lay = nc_layout(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "switch_norm_moments_cpu",
                                  [&] { NORMKIT_BEST_ISA(moments_kernel<scalar_t>)(x, lay, out); });
  return out;
}

at::Tensor grad_moments_cpu(const at::Tensor& grad_output, const at::Tensor& input) {
  check_grad_output(grad_output, input);
  at::Tensor out = plane_stats_like(input);
  const at::Tensor x = to_nc_layout(input);
  const at::Tensor dy = match_nc_layout(grad_output, x);
  const NCLayout lay = nc_layout(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "switch_norm_grad_moments_cpu",
                                  [&] { NORMKIT_BEST_ISA(grad_moments_kernel<scalar_t>)(dy, x, lay, out); });
  return out;
}

template <int kCoef>
at::Tensor per_plane_affine_cpu(const at::Tensor& a, const at::Tensor* b, const at::Tensor& coefficients) {
  const PlaneAffineArgs args(a, b, coefficients, kCoef);
  if (args.a.numel() == 0) return args.out;
  at::Tensor out = args.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "switch_norm_affine_cpu", [&] {
    NORMKIT_BEST_ISA(per_plane_affine_kernel<scalar_t, kCoef>)(args.a, args.b, args.coefficients, args.layout, out);
  });
  return out;
}

at::Tensor affine_cpu(const at::Tensor& input, const at::Tensor& coefficients) {
  return per_plane_affine_cpu<2>(input, nullptr, coefficients);
}

at::Tensor affine_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& coefficients) {
  check_grad_output(grad_output, input);
  // Written in the layout of `input` (the saved activation), so dx matches x's memory format.
  const at::Tensor x = to_nc_layout(input);
  return per_plane_affine_cpu<3>(match_nc_layout(grad_output, x), &x, coefficients);
}

// ---------------------------------------------------------------------------------------------------------------
// O(N*C) coefficient steps (cpu/switch_norm_coefficients.inc), also built for the baseline and for AVX2+FMA.

#define NORMKIT_ISA_SOURCE "cpu/switch_norm_coefficients.inc"
#include "cpu/isa_builds.h"

std::tuple<at::Tensor, at::Tensor> forward_coefficients_cpu(
    const at::Tensor& moments, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean_weight, const at::Tensor& var_weight, const c10::optional<at::Tensor>& bn_stats,
    int64_t count, bool has_instance, double eps) {
  const ForwardCoefficientArgs args(moments, weight, bias, mean_weight, var_weight, bn_stats, has_instance);
  if (args.moments.numel() == 0) return {args.coefficients, args.bn_used};  // zero statistics, as on CUDA
  AT_DISPATCH_FLOATING_TYPES(args.moments.scalar_type(), "switch_norm_forward_coefficients_cpu", [&] {
    NORMKIT_BEST_ISA(run_forward_coefficients<scalar_t>)(args, count, has_instance, eps);
  });
  return {args.coefficients, args.bn_used};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_reduce_cpu(
    const at::Tensor& grad_moments, const at::Tensor& moments, const at::Tensor& bn_stats,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean_weight, const at::Tensor& var_weight,
    int64_t count, bool has_instance, double eps) {
  const BackwardArgs args(grad_moments, moments, bn_stats, c10::nullopt, weight, mean_weight, var_weight, has_instance);
  const int64_t C = args.C();
  const auto opts = args.moments.options();
  at::Tensor grad_weight = at::empty({C}, opts), grad_bias = at::empty({C}, opts);
  at::Tensor grad_mean_weight = at::empty({args.params.K}, opts), grad_var_weight = at::empty({args.params.K}, opts);
  at::Tensor bn_grad = at::empty({2, C}, opts);
  AT_DISPATCH_FLOATING_TYPES(args.moments.scalar_type(), "switch_norm_backward_reduce_cpu", [&] {
    NORMKIT_BEST_ISA(run_backward_reduce<scalar_t>)(args, count, has_instance, eps, grad_weight, grad_bias, bn_grad,
                                                   grad_mean_weight, grad_var_weight);
  });
  return {grad_weight, grad_bias, grad_mean_weight, grad_var_weight, bn_grad};
}

at::Tensor backward_coefficients_cpu(const at::Tensor& grad_moments, const at::Tensor& moments,
                                     const at::Tensor& bn_stats, const c10::optional<at::Tensor>& bn_grad,
                                     const c10::optional<at::Tensor>& weight, const at::Tensor& mean_weight,
                                     const at::Tensor& var_weight, int64_t count, bool has_instance, double eps) {
  const BackwardArgs args(grad_moments, moments, bn_stats, bn_grad, weight, mean_weight, var_weight, has_instance);
  at::Tensor coef = at::empty({args.N(), args.C(), 3}, args.moments.options());
  AT_DISPATCH_FLOATING_TYPES(args.moments.scalar_type(), "switch_norm_backward_coefficients_cpu", [&] {
    NORMKIT_BEST_ISA(run_backward_coefficients<scalar_t>)(args, count, has_instance, eps, coef);
  });
  return coef;
}

}  // namespace

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("_switch_norm_moments", &moments_cpu);
  m.impl("_switch_norm_forward_coefficients", &forward_coefficients_cpu);
  m.impl("_switch_norm_affine", &affine_cpu);
  m.impl("_switch_norm_grad_moments", &grad_moments_cpu);
  m.impl("_switch_norm_backward_reduce", &backward_reduce_cpu);
  m.impl("_switch_norm_backward_coefficients", &backward_coefficients_cpu);
  m.impl("_switch_norm_affine_backward", &affine_backward_cpu);
}

}  // namespace normkit
