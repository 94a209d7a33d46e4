// Switchable Normalization, CPU kernels. Two streaming passes forward (moments, affine), two backward
// (gradient moments, affine backward), and O(N*C) coefficient steps between them whose arithmetic is shared with
// the CUDA kernels through common/switch_norm.h.
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
// O(N*C) coefficient steps. The loops over channels vectorize (`omp simd`, or `GCC ivdep` where a loop body keeps
// structs by reference: inlined scalar math, no branch that varies with c, rows of the (N, C) tables in order), and
// every sum keeps one order whatever the thread count, so results do not depend on it.

// Grain (in planes) of the coefficient loops: 5-12 ns a plane once vectorized, so a task holds 20-50 us of work,
// more than waking a thread that the streaming pass before just used. (32 x 256 planes: the backward coefficient
// step takes 0.09 ms on one thread, 0.06 ms on two.)
constexpr int64_t kPlaneGrain = 4096;

// body(n) for every sample (row of the (N, C) tables), in parallel.
template <typename F>
inline void parallel_rows(int64_t rows, int64_t row_len, const F& body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kPlaneGrain / std::max<int64_t>(row_len, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) body(r);
                   });
}

// body(c0, c1) for ranges of channels, in parallel; the body walks the samples in order within its range, so
// per-channel sums over the batch vectorize across channels.
template <typename F>
inline void parallel_channel_ranges(int64_t C, int64_t N, const F& body) {
  at::parallel_for(0, C, std::max<int64_t>(1, kPlaneGrain / std::max<int64_t>(N, 1)), body);
}

// LN statistics per sample, (mean, var) for each n.
template <typename acc_t>
std::vector<acc_t> layer_stats(const acc_t* mom, int64_t N, int64_t C, const GroupForm<acc_t>& group_form) {
  std::vector<acc_t> ln(2 * N);
  const GroupForm<acc_t> form = group_form;
  parallel_rows(N, C, [&](int64_t n) {
    const acc_t* row = mom + 2 * n * C;
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += row[2 * c];
    const acc_t mean = s / acc_t(C);
    acc_t v = 0;
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < C; ++c) v += form.member_term(row[2 * c], row[2 * c + 1], mean);
    ln[2 * n] = mean;
    ln[2 * n + 1] = v / form.denominator(acc_t(C));
  });
  return ln;
}

// BN statistics per channel from the batch: bn = [mean; var; members], (3, C).
template <typename acc_t>
void batch_stats(const acc_t* mom, int64_t N, int64_t C, const GroupForm<acc_t>& group_form, acc_t* bn) {
  const GroupForm<acc_t> form = group_form;
  parallel_channel_ranges(C, N, [&](int64_t c0, int64_t c1) {
    acc_t* mean = bn;
    acc_t* var = bn + C;
    std::fill(mean + c0, mean + c1, acc_t(0));
    std::fill(var + c0, var + c1, acc_t(0));
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* row = mom + 2 * n * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) mean[c] += row[2 * c];
    }
    for (int64_t c = c0; c < c1; ++c) mean[c] /= acc_t(N);
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* row = mom + 2 * n * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) var[c] += form.member_term(row[2 * c], row[2 * c + 1], mean[c]);
    }
    const acc_t denominator = form.denominator(acc_t(N));
    for (int64_t c = c0; c < c1; ++c) {
      var[c] /= denominator;
      bn[2 * C + c] = acc_t(N);
    }
  });
}

// scale and shift of every plane, (N, C, 2).
template <typename acc_t>
void forward_coefficients_kernel(const acc_t* mom, const acc_t* ln, const acc_t* bn, const acc_t* gamma,
                                 const acc_t* beta, const Mixture<acc_t>& mixture, const GroupForm<acc_t>& group_form,
                                 acc_t eps, int64_t N, int64_t C, acc_t* coef) {
  const Mixture<acc_t> mix = mixture;  // local copies: their fields stay in registers across the loop
  const GroupForm<acc_t> form = group_form;
  parallel_rows(N, C, [&](int64_t n) {
    const acc_t ln_mean = ln[2 * n], ln_var = ln[2 * n + 1];
    const acc_t* m = mom + 2 * n * C;
    acc_t* out = coef + 2 * n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const Normalizer<acc_t> nz(mix, form, m[2 * c], m[2 * c + 1], ln_mean, ln_var, bn[c], bn[C + c], eps);
      plane_coefficients(nz, gamma[c], beta[c], out + 2 * c);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward_coefficients_cpu(
    const at::Tensor& moments, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean_weight, const at::Tensor& var_weight, const c10::optional<at::Tensor>& bn_stats,
    int64_t count, bool has_instance, double eps) {
  ForwardCoefficientArgs args(moments, weight, bias, mean_weight, var_weight, bn_stats, has_instance);
  const Params& params = args.params;
  const int64_t N = args.moments.size(0), C = args.moments.size(1);
  AT_DISPATCH_FLOATING_TYPES(args.moments.scalar_type(), "switch_norm_forward_coefficients_cpu", [&] {
    const scalar_t* mom = args.moments.const_data_ptr<scalar_t>();
    const GroupForm<scalar_t> form(has_instance, count);
    const Mixture<scalar_t> mix(params.mean_logits.const_data_ptr<scalar_t>(),
                                params.var_logits.const_data_ptr<scalar_t>(), params.K, has_instance);
    const std::vector<scalar_t> ln = layer_stats(mom, N, C, form);
    scalar_t* bn = args.bn_used.mutable_data_ptr<scalar_t>();
    if (mix.has_bn() && !args.bn_given) batch_stats(mom, N, C, form, bn);
    forward_coefficients_kernel(mom, ln.data(), bn, params.gamma.const_data_ptr<scalar_t>(),
                                params.beta.const_data_ptr<scalar_t>(), mix, form, scalar_t(eps), N, C,
                                args.coefficients.mutable_data_ptr<scalar_t>());
  });
  return {args.coefficients, args.bn_used};
}

// What both backward steps read of every (n, c) plane: raw pointers and values, cheap to copy, so that the
// vectorized loops hold them in registers. `ln` (the LN statistics, 2 N values) is owned by the caller.
template <typename acc_t>
struct BackwardContext {
  const acc_t *mom, *gm, *gamma, *bn, *ln;
  Mixture<acc_t> mix;
  GroupForm<acc_t> form;
  int64_t N, C;
  acc_t eps;

  BackwardContext(const BackwardArgs& args, const std::vector<acc_t>& layer_stats_storage, int64_t count,
                  bool has_instance, double eps_in)
      : mom(args.moments.const_data_ptr<acc_t>()),
        gm(args.grad_moments.const_data_ptr<acc_t>()),
        gamma(args.params.gamma.const_data_ptr<acc_t>()),
        bn(args.bn_stats.const_data_ptr<acc_t>()),
        ln(layer_stats_storage.data()),
        mix(args.params.mean_logits.const_data_ptr<acc_t>(), args.params.var_logits.const_data_ptr<acc_t>(),
            args.params.K, has_instance),
        form(has_instance, count),
        N(args.N()),
        C(args.C()),
        eps(acc_t(eps_in)) {}

  Normalizer<acc_t> normalizer(int64_t n, int64_t c) const {
    const int64_t p = n * C + c;
    return Normalizer<acc_t>(mix, form, mom[2 * p], mom[2 * p + 1], ln[2 * n], ln[2 * n + 1], bn[c], bn[C + c], eps);
  }
  PlaneGrad<acc_t> plane_grad(const Normalizer<acc_t>& nz, int64_t n, int64_t c) const {
    const int64_t p = n * C + c;
    return PlaneGrad<acc_t>(nz, gamma[c], gm[2 * p], gm[2 * p + 1]);
  }
  // The dx coefficients of plane (n, c) into `coef`, given its sample's LN-statistic gradients. A function of its
  // own because `omp simd` keeps a named local of the loop body whose address is taken (the Normalizer here) in
  // per-lane memory, which leaves the loop scalar; locals of an inlined callee stay in registers.
  template <bool kWithBn>
  void input_grad(int64_t n, int64_t c, acc_t ln_grad_mean, acc_t ln_grad_var, const acc_t* bn_grad,
                  acc_t* coef) const {
    const Normalizer<acc_t> nz = normalizer(n, c);
    plane_input_grad(mix, form, plane_grad(nz, n, c), gamma[c] * nz.rstd, mom[2 * (n * C + c)], acc_t(C), ln[2 * n],
                     ln_grad_mean, ln_grad_var, kWithBn, bn[2 * C + c], bn[c], kWithBn ? bn_grad[c] : acc_t(0),
                     kWithBn ? bn_grad[C + c] : acc_t(0), coef);
  }
};

// Per-channel sums over the batch (weight, bias and BN-statistic gradients) and the mixture-weight gradients.
template <typename acc_t>
void backward_reduce_kernel(const BackwardContext<acc_t>& ctx, acc_t* grad_weight, acc_t* grad_bias,
                            acc_t* bn_grad, acc_t* grad_mean_logits, acc_t* grad_var_logits) {
  const int64_t N = ctx.N, C = ctx.C;
  // Each channel's shares of the mixture-weight gradients, [IN, LN, BN] of the mean then of the variance: (6, C),
  // summed over the channels in order afterwards.
  std::vector<acc_t> parts(6 * C, acc_t(0));
  acc_t* mixture_parts = parts.data();
  parallel_channel_ranges(C, N, [&](int64_t c0, int64_t c1) {
    const BackwardContext<acc_t> local = ctx;  // a copy: fields in registers, not re-read through a reference
    std::fill(grad_weight + c0, grad_weight + c1, acc_t(0));
    std::fill(grad_bias + c0, grad_bias + c1, acc_t(0));
    std::fill(bn_grad + c0, bn_grad + c1, acc_t(0));
    std::fill(bn_grad + C + c0, bn_grad + C + c1, acc_t(0));
    for (int64_t n = 0; n < N; ++n) {
#pragma GCC ivdep
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t p = n * C + c;
        const PlaneGrad<acc_t> g = local.plane_grad(local.normalizer(n, c), n, c);
        grad_weight[c] += g.grad_gamma;
        grad_bias[c] += local.gm[2 * p];
        bn_grad[c] += g.grad_mean;
        bn_grad[C + c] += g.grad_var;
        accumulate_mixture_grads(g, local.form, local.mom[2 * p], local.mom[2 * p + 1], local.ln[2 * n],
                                 local.ln[2 * n + 1], local.bn[c], local.bn[C + c], mixture_parts + c,
                                 mixture_parts + 3 * C + c, C);
      }
    }
  });
  acc_t d_mean_w[3] = {0, 0, 0}, d_var_w[3] = {0, 0, 0};
  for (int i = 0; i < 3; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      d_mean_w[i] += mixture_parts[i * C + c];
      d_var_w[i] += mixture_parts[(3 + i) * C + c];
    }
  }
  softmax_backward(ctx.mix.mean_w, d_mean_w, ctx.mix.first, ctx.mix.num, grad_mean_logits);
  softmax_backward(ctx.mix.var_w, d_var_w, ctx.mix.first, ctx.mix.num, grad_var_logits);
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
    const std::vector<scalar_t> ln =
        layer_stats(args.moments.const_data_ptr<scalar_t>(), args.N(), C, GroupForm<scalar_t>(has_instance, count));
    backward_reduce_kernel(BackwardContext<scalar_t>(args, ln, count, has_instance, eps),
                           grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(),
                           bn_grad.mutable_data_ptr<scalar_t>(), grad_mean_weight.mutable_data_ptr<scalar_t>(),
                           grad_var_weight.mutable_data_ptr<scalar_t>());
  });
  return {grad_weight, grad_bias, grad_mean_weight, grad_var_weight, bn_grad};
}

// dx = c1 * dy + c2 * x + c3 coefficients of every plane, (N, C, 3). `bn_grad` (2, C) is the reduced BN-statistic
// gradient, read only with kWithBn (a template parameter, so that the channel loop has no branch).
template <typename acc_t, bool kWithBn>
void backward_coefficients_kernel(const BackwardContext<acc_t>& shared_ctx, const acc_t* bn_grad, acc_t* coef) {
  const int64_t N = shared_ctx.N, C = shared_ctx.C;
  parallel_rows(N, C, [&](int64_t n) {
    const BackwardContext<acc_t> ctx = shared_ctx;  // a copy: fields in registers, not re-read through a reference
    // The sample's LN-statistic gradients first; the plane gradients are recomputed (cheaper than storing them).
    acc_t ln_grad_mean = 0, ln_grad_var = 0;
#pragma omp simd reduction(+ : ln_grad_mean, ln_grad_var)
    for (int64_t c = 0; c < C; ++c) {
      const PlaneGrad<acc_t> g = ctx.plane_grad(ctx.normalizer(n, c), n, c);
      ln_grad_mean += g.grad_mean;
      ln_grad_var += g.grad_var;
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      ctx.template input_grad<kWithBn>(n, c, ln_grad_mean, ln_grad_var, bn_grad, coef + 3 * (n * C + c));
    }
  });
}

at::Tensor backward_coefficients_cpu(const at::Tensor& grad_moments, const at::Tensor& moments,
                                     const at::Tensor& bn_stats, const c10::optional<at::Tensor>& bn_grad,
                                     const c10::optional<at::Tensor>& weight, const at::Tensor& mean_weight,
                                     const at::Tensor& var_weight, int64_t count, bool has_instance, double eps) {
  const BackwardArgs args(grad_moments, moments, bn_stats, bn_grad, weight, mean_weight, var_weight, has_instance);
  at::Tensor coef = at::empty({args.N(), args.C(), 3}, args.moments.options());
  AT_DISPATCH_FLOATING_TYPES(args.moments.scalar_type(), "switch_norm_backward_coefficients_cpu", [&] {
    const std::vector<scalar_t> ln = layer_stats(args.moments.const_data_ptr<scalar_t>(), args.N(), args.C(),
                                                 GroupForm<scalar_t>(has_instance, count));
    const BackwardContext<scalar_t> ctx(args, ln, count, has_instance, eps);
    scalar_t* out = coef.mutable_data_ptr<scalar_t>();
    if (ctx.mix.has_bn() && args.bn_grad.defined()) {
      backward_coefficients_kernel<scalar_t, true>(ctx, args.bn_grad.const_data_ptr<scalar_t>(), out);
    } else {
      backward_coefficients_kernel<scalar_t, false>(ctx, nullptr, out);
    }
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
