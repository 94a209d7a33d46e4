// Switchable Normalization, CPU kernels. Two streaming passes forward (moments, affine), two backward
// (gradient moments, affine backward), and O(N*C) coefficient steps between them whose arithmetic is shared with
// the CUDA kernels through common/switch_norm.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
// O(N*C) coefficient steps. Parallel over samples or channels; every sum keeps one order whatever the thread
// count, so results do not depend on it.

// Grain (in planes) of the coefficient loops, ~10 ns a plane: waking the other threads (tens of microseconds with
// OMP_WAIT_POLICY=PASSIVE) costs more below tens of thousands of planes.
constexpr int64_t kPlaneGrain = 32768;

template <typename F>
inline void parallel_rows(int64_t rows, int64_t row_len, const F& body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kPlaneGrain / std::max<int64_t>(row_len, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) body(r);
                   });
}

// LN statistics per sample, (mean, var) for each n.
template <typename acc_t>
std::vector<acc_t> layer_stats(const acc_t* mom, int64_t N, int64_t C, const GroupForm<acc_t>& form) {
  std::vector<acc_t> ln(2 * N);
  parallel_rows(N, C, [&](int64_t n) {
    const acc_t* row = mom + 2 * n * C;
    acc_t s = 0;
    for (int64_t c = 0; c < C; ++c) s += row[2 * c];
    const acc_t mean = s / acc_t(C);
    acc_t v = 0;
    for (int64_t c = 0; c < C; ++c) v += form.member_term(row[2 * c], row[2 * c + 1], mean);
    ln[2 * n] = mean;
    ln[2 * n + 1] = v / form.denominator(acc_t(C));
  });
  return ln;
}

std::tuple<at::Tensor, at::Tensor> forward_coefficients_cpu(
    const at::Tensor& moments, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean_weight, const at::Tensor& var_weight, const c10::optional<at::Tensor>& bn_stats,
    int64_t count, bool has_instance, double eps) {
  ForwardCoefficientArgs args(moments, weight, bias, mean_weight, var_weight, bn_stats, has_instance);
  const at::Tensor& mom_t = args.moments;
  const Params& params = args.params;
  const int64_t N = mom_t.size(0), C = mom_t.size(1);
  AT_DISPATCH_FLOATING_TYPES(mom_t.scalar_type(), "switch_norm_forward_coefficients_cpu", [&] {
    const scalar_t* mom = mom_t.const_data_ptr<scalar_t>();
    const GroupForm<scalar_t> form(has_instance, count);
    const Mixture<scalar_t> mix(params.mean_logits.const_data_ptr<scalar_t>(),
                                params.var_logits.const_data_ptr<scalar_t>(), params.K, has_instance);
    const std::vector<scalar_t> ln = layer_stats(mom, N, C, form);
    scalar_t* bn = args.bn_used.mutable_data_ptr<scalar_t>();
    if (mix.has_bn() && !args.bn_given) {
      parallel_rows(C, N, [&](int64_t c) {
        scalar_t s = 0;
        for (int64_t n = 0; n < N; ++n) s += mom[2 * (n * C + c)];
        const scalar_t mean = s / scalar_t(N);
        scalar_t v = 0;
        for (int64_t n = 0; n < N; ++n) v += form.member_term(mom[2 * (n * C + c)], mom[2 * (n * C + c) + 1], mean);
        bn[c] = mean;
        bn[C + c] = v / form.denominator(scalar_t(N));
        bn[2 * C + c] = scalar_t(N);
      });
    }
    const scalar_t* gamma = params.gamma.const_data_ptr<scalar_t>();
    const scalar_t* beta = params.beta.const_data_ptr<scalar_t>();
    scalar_t* cp = args.coefficients.mutable_data_ptr<scalar_t>();
    parallel_rows(N, C, [&](int64_t n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = n * C + c;
        const Normalizer<scalar_t> nz(mix, form, mom[2 * p], mom[2 * p + 1], ln[2 * n], ln[2 * n + 1], bn[c],
                                      bn[C + c], scalar_t(eps));
        plane_coefficients(nz, gamma[c], beta[c], cp + 2 * p);
      }
    });
  });
  return {args.coefficients, args.bn_used};
}

// What both backward steps need of every (n, c) plane.
template <typename acc_t>
struct BackwardContext {
  const acc_t *mom, *gm, *gamma, *bn;
  std::vector<acc_t> ln;
  Mixture<acc_t> mix;
  GroupForm<acc_t> form;
  int64_t N, C;
  acc_t eps;

  BackwardContext(const BackwardArgs& args, int64_t count, bool has_instance, double eps_in)
      : mom(args.moments.const_data_ptr<acc_t>()),
        gm(args.grad_moments.const_data_ptr<acc_t>()),
        gamma(args.params.gamma.const_data_ptr<acc_t>()),
        bn(args.bn_stats.const_data_ptr<acc_t>()),
        mix(args.params.mean_logits.const_data_ptr<acc_t>(), args.params.var_logits.const_data_ptr<acc_t>(),
            args.params.K, has_instance),
        form(has_instance, count),
        N(args.N()),
        C(args.C()),
        eps(acc_t(eps_in)) {
    ln = layer_stats(mom, N, C, form);
  }

  Normalizer<acc_t> normalizer(int64_t n, int64_t c) const {
    const int64_t p = n * C + c;
    return Normalizer<acc_t>(mix, form, mom[2 * p], mom[2 * p + 1], ln[2 * n], ln[2 * n + 1], bn[c], bn[C + c], eps);
  }
  PlaneGrad<acc_t> plane_grad(const Normalizer<acc_t>& nz, int64_t n, int64_t c) const {
    const int64_t p = n * C + c;
    return PlaneGrad<acc_t>(nz, gamma[c], gm[2 * p], gm[2 * p + 1]);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_reduce_cpu(
    const at::Tensor& grad_moments, const at::Tensor& moments, const at::Tensor& bn_stats,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean_weight, const at::Tensor& var_weight,
    int64_t count, bool has_instance, double eps) {
  const BackwardArgs args(grad_moments, moments, bn_stats, c10::nullopt, weight, mean_weight, var_weight, has_instance);
  const int64_t N = args.N(), C = args.C();
  const auto opts = args.moments.options();
  at::Tensor grad_weight = at::empty({C}, opts), grad_bias = at::empty({C}, opts);
  at::Tensor grad_mean_weight = at::empty({args.params.K}, opts), grad_var_weight = at::empty({args.params.K}, opts);
  at::Tensor bn_grad = at::empty({2, C}, opts);
  AT_DISPATCH_FLOATING_TYPES(args.moments.scalar_type(), "switch_norm_backward_reduce_cpu", [&] {
    const BackwardContext<scalar_t> ctx(args, count, has_instance, eps);
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    scalar_t* bg = bn_grad.mutable_data_ptr<scalar_t>();
    // Per channel: sums over the batch, and the channel's share of the mixture-weight gradients.
    std::vector<scalar_t> mixture_parts(6 * C);
    parallel_rows(C, N, [&](int64_t c) {
      scalar_t w = 0, b = 0, bm = 0, bv = 0;
      scalar_t* d_mean_w = mixture_parts.data() + 6 * c;
      scalar_t* d_var_w = d_mean_w + 3;
      std::fill(d_mean_w, d_mean_w + 6, scalar_t(0));
      for (int64_t n = 0; n < N; ++n) {
        const int64_t p = n * C + c;
        const PlaneGrad<scalar_t> g = ctx.plane_grad(ctx.normalizer(n, c), n, c);
        w += g.grad_gamma;
        b += ctx.gm[2 * p];
        bm += g.grad_mean;
        bv += g.grad_var;
        accumulate_mixture_grads(g, ctx.form, ctx.mom[2 * p], ctx.mom[2 * p + 1], ctx.ln[2 * n], ctx.ln[2 * n + 1],
                                 ctx.bn[c], ctx.bn[C + c], d_mean_w, d_var_w);
      }
      gw[c] = w;
      gb[c] = b;
      bg[c] = bm;
      bg[C + c] = bv;
    });
    scalar_t d_mean_w[3] = {0, 0, 0}, d_var_w[3] = {0, 0, 0};
    for (int64_t c = 0; c < C; ++c) {
      for (int i = 0; i < 3; ++i) {
        d_mean_w[i] += mixture_parts[6 * c + i];
        d_var_w[i] += mixture_parts[6 * c + 3 + i];
      }
    }
    softmax_backward(ctx.mix.mean_w, d_mean_w, ctx.mix.first, args.params.K,
                     grad_mean_weight.mutable_data_ptr<scalar_t>());
    softmax_backward(ctx.mix.var_w, d_var_w, ctx.mix.first, args.params.K,
                     grad_var_weight.mutable_data_ptr<scalar_t>());
  });
  return {grad_weight, grad_bias, grad_mean_weight, grad_var_weight, bn_grad};
}

at::Tensor backward_coefficients_cpu(const at::Tensor& grad_moments, const at::Tensor& moments,
                                     const at::Tensor& bn_stats, const c10::optional<at::Tensor>& bn_grad,
                                     const c10::optional<at::Tensor>& weight, const at::Tensor& mean_weight,
                                     const at::Tensor& var_weight, int64_t count, bool has_instance, double eps) {
  const BackwardArgs args(grad_moments, moments, bn_stats, bn_grad, weight, mean_weight, var_weight, has_instance);
  const int64_t N = args.N(), C = args.C();
  at::Tensor coef = at::empty({N, C, 3}, args.moments.options());
  AT_DISPATCH_FLOATING_TYPES(args.moments.scalar_type(), "switch_norm_backward_coefficients_cpu", [&] {
    const BackwardContext<scalar_t> ctx(args, count, has_instance, eps);
    const bool with_bn = ctx.mix.has_bn() && args.bn_grad.defined();
    const scalar_t* bg = with_bn ? args.bn_grad.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bn = ctx.bn;
    scalar_t* cp = coef.mutable_data_ptr<scalar_t>();
    parallel_rows(N, C, [&](int64_t n) {
      std::vector<PlaneGrad<scalar_t>> grads;  // of this sample's planes, needed twice
      std::vector<scalar_t> gamma_rstd;
      grads.reserve(C);
      gamma_rstd.reserve(C);
      scalar_t ln_grad_mean = 0, ln_grad_var = 0;
      for (int64_t c = 0; c < C; ++c) {
        const Normalizer<scalar_t> nz = ctx.normalizer(n, c);
        grads.push_back(ctx.plane_grad(nz, n, c));
        gamma_rstd.push_back(ctx.gamma[c] * nz.rstd);
        ln_grad_mean += grads.back().grad_mean;
        ln_grad_var += grads.back().grad_var;
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = n * C + c;
        plane_input_grad(ctx.mix, ctx.form, grads[c], gamma_rstd[c], ctx.mom[2 * p], scalar_t(C), ctx.ln[2 * n],
                         ln_grad_mean, ln_grad_var, with_bn, with_bn ? bn[2 * C + c] : scalar_t(0), bn[c],
                         with_bn ? bg[c] : scalar_t(0), with_bn ? bg[C + c] : scalar_t(0), cp + 3 * p);
      }
    });
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
