// Switchable Normalization, CPU kernels. Two streaming passes forward (moments, affine), two backward
// (gradient moments, affine backward), and O(N*C) coefficient steps between them whose arithmetic is shared with
// the CUDA kernels through common/switch_norm.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/nc_layout.h"
#include "common/switch_norm.h"
#include "common/switch_norm_host.h"

namespace normkit {
namespace {

using namespace switch_norm;

// Channels per task in the channels-last reductions: keeps the per-task accumulators in L1.
constexpr int64_t kChannelBlock = 256;
// Elements per inner (vectorized) partial sum; partial sums are then added in order, bounding rounding growth.
constexpr int64_t kChunk = 1024;

template <typename acc_t, typename F>
inline acc_t chunked_sum(int64_t n, const F& f) {
  acc_t total = 0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = start; i < end; ++i) s += f(i);
    total += s;
  }
  return total;
}

// Calls body(n, c0, cb) for every sample n and block of channels [c0, c0 + cb), in parallel.
template <typename F>
inline void parallel_channel_blocks(const NCLayout& lay, const F& body) {
  const int64_t blocks = (lay.C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, lay.N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = (t % blocks) * kChannelBlock;
      body(t / blocks, c0, std::min(kChannelBlock, lay.C - c0));
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Streaming passes

template <typename scalar_t>
void moments_kernel(const at::Tensor& x, const NCLayout& lay, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* mp = out.mutable_data_ptr<acc_t>();
  const acc_t inv_l = acc_t(1) / acc_t(lay.L);
  if (!lay.channels_last) {
    at::parallel_for(0, lay.N * lay.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* px = xp + p * lay.L;
        // Two passes over a plane that stays in cache: exact mean first, then squared deviations from it.
        const acc_t mean = chunked_sum<acc_t>(lay.L, [&](int64_t i) { return acc_t(px[i]); }) * inv_l;
        mp[2 * p] = mean;
        mp[2 * p + 1] = chunked_sum<acc_t>(lay.L, [&](int64_t i) {
          const acc_t d = acc_t(px[i]) - mean;
          return d * d;
        });
      }
    });
    return;
  }
  parallel_channel_blocks(lay, [&](int64_t n, int64_t c0, int64_t cb) {
    acc_t mean[kChannelBlock], m2[kChannelBlock];
    std::fill(mean, mean + cb, acc_t(0));
    std::fill(m2, m2 + cb, acc_t(0));
    const scalar_t* base = xp + n * lay.L * lay.C + c0;
    for (int64_t l = 0; l < lay.L; ++l) {
      const scalar_t* row = base + l * lay.C;
#pragma omp simd
      for (int64_t j = 0; j < cb; ++j) mean[j] += acc_t(row[j]);
    }
    for (int64_t j = 0; j < cb; ++j) mean[j] *= inv_l;
    for (int64_t l = 0; l < lay.L; ++l) {
      const scalar_t* row = base + l * lay.C;
#pragma omp simd
      for (int64_t j = 0; j < cb; ++j) {
        const acc_t d = acc_t(row[j]) - mean[j];
        m2[j] += d * d;
      }
    }
    acc_t* out_row = mp + (n * lay.C + c0) * 2;
    for (int64_t j = 0; j < cb; ++j) {
      out_row[2 * j] = mean[j];
      out_row[2 * j + 1] = m2[j];
    }
  });
}

at::Tensor moments_cpu(const at::Tensor& input) {
  at::Tensor out = plane_stats_like(input);
  const at::Tensor x = to_nc_layout(input);
  const NCLayout lay = nc_layout(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "switch_norm_moments_cpu",
                                  [&] { moments_kernel<scalar_t>(x, lay, out); });
  return out;
}

template <typename scalar_t>
void grad_moments_kernel(const at::Tensor& dy, const at::Tensor& x, const NCLayout& lay, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = dy.const_data_ptr<scalar_t>();
  acc_t* sp = out.mutable_data_ptr<acc_t>();
  if (!lay.channels_last) {
    at::parallel_for(0, lay.N * lay.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* px = xp + p * lay.L;
        const scalar_t* pg = gp + p * lay.L;
        acc_t sum_dy = 0, sum_dy_x = 0;
        for (int64_t start = 0; start < lay.L; start += kChunk) {
          const int64_t stop = std::min(lay.L, start + kChunk);
          acc_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
          for (int64_t i = start; i < stop; ++i) {
            const acc_t g = acc_t(pg[i]);
            a += g;
            b += g * acc_t(px[i]);
          }
          sum_dy += a;
          sum_dy_x += b;
        }
        sp[2 * p] = sum_dy;
        sp[2 * p + 1] = sum_dy_x;
      }
    });
    return;
  }
  parallel_channel_blocks(lay, [&](int64_t n, int64_t c0, int64_t cb) {
    acc_t a[kChannelBlock], b[kChannelBlock];
    std::fill(a, a + cb, acc_t(0));
    std::fill(b, b + cb, acc_t(0));
    const int64_t offset = n * lay.L * lay.C + c0;
    for (int64_t l = 0; l < lay.L; ++l) {
      const scalar_t* rx = xp + offset + l * lay.C;
      const scalar_t* rg = gp + offset + l * lay.C;
#pragma omp simd
      for (int64_t j = 0; j < cb; ++j) {
        const acc_t g = acc_t(rg[j]);
        a[j] += g;
        b[j] += g * acc_t(rx[j]);
      }
    }
    acc_t* out_row = sp + (n * lay.C + c0) * 2;
    for (int64_t j = 0; j < cb; ++j) {
      out_row[2 * j] = a[j];
      out_row[2 * j + 1] = b[j];
    }
  });
}

at::Tensor grad_moments_cpu(const at::Tensor& grad_output, const at::Tensor& input) {
  check_grad_output(grad_output, input);
  at::Tensor out = plane_stats_like(input);
  const at::Tensor x = to_nc_layout(input);
  const at::Tensor dy = match_nc_layout(grad_output, x);
  const NCLayout lay = nc_layout(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "switch_norm_grad_moments_cpu",
                                  [&] { grad_moments_kernel<scalar_t>(dy, x, lay, out); });
  return out;
}

// out = coef[n,c,0] * a + coef[n,c,1] * b + coef[n,c,2]  (kCoef == 2: out = coef0 * a + coef1).
// Serves both the forward affine (scale, shift) and the input gradient (c1 * dy + c2 * x + c3).
template <typename scalar_t, int kCoef>
void per_plane_affine_kernel(const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef, const NCLayout& lay,
                             at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* cp = coef.const_data_ptr<acc_t>();
  const scalar_t* ap = a.const_data_ptr<scalar_t>();
  const scalar_t* bp = kCoef == 3 ? b.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  if (!lay.channels_last) {
    at::parallel_for(0, lay.N * lay.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const acc_t* k = cp + p * kCoef;
        const int64_t base = p * lay.L;
        if constexpr (kCoef == 3) {
#pragma omp simd
          for (int64_t i = base; i < base + lay.L; ++i) op[i] = scalar_t(k[0] * acc_t(ap[i]) + k[1] * acc_t(bp[i]) + k[2]);
        } else {
#pragma omp simd
          for (int64_t i = base; i < base + lay.L; ++i) op[i] = scalar_t(k[0] * acc_t(ap[i]) + k[1]);
        }
      }
    });
    return;
  }
  parallel_channel_blocks(lay, [&](int64_t n, int64_t c0, int64_t cb) {
    acc_t k[kCoef][kChannelBlock];  // de-interleaved so the row loop vectorizes
    for (int64_t j = 0; j < cb; ++j)
      for (int q = 0; q < kCoef; ++q) k[q][j] = cp[(n * lay.C + c0 + j) * kCoef + q];
    for (int64_t l = 0; l < lay.L; ++l) {
      const int64_t base = (n * lay.L + l) * lay.C + c0;
      if constexpr (kCoef == 3) {
#pragma omp simd
        for (int64_t j = 0; j < cb; ++j)
          op[base + j] = scalar_t(k[0][j] * acc_t(ap[base + j]) + k[1][j] * acc_t(bp[base + j]) + k[2][j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < cb; ++j) op[base + j] = scalar_t(k[0][j] * acc_t(ap[base + j]) + k[1][j]);
      }
    }
  });
}

template <int kCoef>
at::Tensor per_plane_affine_cpu(const at::Tensor& a, const at::Tensor* b, const at::Tensor& coefficients) {
  const PlaneAffineArgs args(a, b, coefficients, kCoef);
  if (args.a.numel() == 0) return args.out;
  at::Tensor out = args.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "switch_norm_affine_cpu", [&] {
    per_plane_affine_kernel<scalar_t, kCoef>(args.a, args.b, args.coefficients, args.layout, out);
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
// O(N*C) coefficient steps (serial: N*C is small next to the streaming passes)

// LN statistics per sample, (mean, var) for each n.
template <typename acc_t>
std::vector<acc_t> layer_stats(const acc_t* mom, int64_t N, int64_t C, const GroupForm<acc_t>& form) {
  std::vector<acc_t> ln(2 * N);
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* row = mom + 2 * n * C;
    acc_t s = 0;
    for (int64_t c = 0; c < C; ++c) s += row[2 * c];
    const acc_t mean = s / acc_t(C);
    acc_t v = 0;
    for (int64_t c = 0; c < C; ++c) v += form.member_term(row[2 * c], row[2 * c + 1], mean);
    ln[2 * n] = mean;
    ln[2 * n + 1] = v / form.denominator(acc_t(C));
  }
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
      for (int64_t c = 0; c < C; ++c) {
        scalar_t s = 0;
        for (int64_t n = 0; n < N; ++n) s += mom[2 * (n * C + c)];
        const scalar_t mean = s / scalar_t(N);
        scalar_t v = 0;
        for (int64_t n = 0; n < N; ++n) v += form.member_term(mom[2 * (n * C + c)], mom[2 * (n * C + c) + 1], mean);
        bn[c] = mean;
        bn[C + c] = v / form.denominator(scalar_t(N));
        bn[2 * C + c] = scalar_t(N);
      }
    }
    const scalar_t* gamma = params.gamma.const_data_ptr<scalar_t>();
    const scalar_t* beta = params.beta.const_data_ptr<scalar_t>();
    scalar_t* cp = args.coefficients.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = n * C + c;
        const Normalizer<scalar_t> nz(mix, form, mom[2 * p], mom[2 * p + 1], ln[2 * n], ln[2 * n + 1], bn[c],
                                      bn[C + c], scalar_t(eps));
        plane_coefficients(nz, gamma[c], beta[c], cp + 2 * p);
      }
    }
  });
  return {args.coefficients, args.bn_used};
}

// Normalizer and gradient of every (n, c) plane, shared by the two backward steps.
template <typename acc_t>
struct BackwardPlanes {
  std::vector<Normalizer<acc_t>> norms;
  std::vector<PlaneGrad<acc_t>> grads;

  BackwardPlanes(const acc_t* mom, const acc_t* gm, const acc_t* gamma, const acc_t* bn, const std::vector<acc_t>& ln,
                 const Mixture<acc_t>& mix, const GroupForm<acc_t>& form, int64_t N, int64_t C, acc_t eps) {
    norms.reserve(N * C);
    grads.reserve(N * C);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = n * C + c;
        norms.emplace_back(mix, form, mom[2 * p], mom[2 * p + 1], ln[2 * n], ln[2 * n + 1], bn[c], bn[C + c], eps);
        grads.emplace_back(norms.back(), gamma[c], gm[2 * p], gm[2 * p + 1]);
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_reduce_cpu(
    const at::Tensor& grad_moments, const at::Tensor& moments, const at::Tensor& bn_stats,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean_weight, const at::Tensor& var_weight,
    int64_t count, bool has_instance, double eps) {
  const BackwardArgs args(grad_moments, moments, bn_stats, c10::nullopt, weight, mean_weight, var_weight, has_instance);
  const at::Tensor &mom_t = args.moments, &bn_t = args.bn_stats, &gm_t = args.grad_moments;
  const Params& params = args.params;
  const int64_t N = args.N(), C = args.C();
  const auto opts = mom_t.options();
  at::Tensor grad_weight = at::zeros({C}, opts), grad_bias = at::zeros({C}, opts);
  at::Tensor grad_mean_weight = at::empty({params.K}, opts), grad_var_weight = at::empty({params.K}, opts);
  at::Tensor bn_grad = at::zeros({2, C}, opts);
  AT_DISPATCH_FLOATING_TYPES(mom_t.scalar_type(), "switch_norm_backward_reduce_cpu", [&] {
    const scalar_t* mom = mom_t.const_data_ptr<scalar_t>();
    const scalar_t* bn = bn_t.const_data_ptr<scalar_t>();
    const scalar_t* gm = gm_t.const_data_ptr<scalar_t>();
    const GroupForm<scalar_t> form(has_instance, count);
    const Mixture<scalar_t> mix(params.mean_logits.const_data_ptr<scalar_t>(),
                                params.var_logits.const_data_ptr<scalar_t>(), params.K, has_instance);
    const std::vector<scalar_t> ln = layer_stats(mom, N, C, form);
    const BackwardPlanes<scalar_t> planes(mom, gm, params.gamma.const_data_ptr<scalar_t>(), bn, ln, mix, form, N, C,
                                          scalar_t(eps));
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    scalar_t* bg = bn_grad.mutable_data_ptr<scalar_t>();
    scalar_t d_mean_w[3] = {0, 0, 0}, d_var_w[3] = {0, 0, 0};
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = n * C + c;
        const PlaneGrad<scalar_t>& g = planes.grads[p];
        gw[c] += g.grad_gamma;
        gb[c] += gm[2 * p];
        bg[c] += g.grad_mean;
        bg[C + c] += g.grad_var;
        accumulate_mixture_grads(g, form, mom[2 * p], mom[2 * p + 1], ln[2 * n], ln[2 * n + 1], bn[c], bn[C + c],
                                 d_mean_w, d_var_w);
      }
    }
    softmax_backward(mix.mean_w, d_mean_w, mix.first, params.K, grad_mean_weight.mutable_data_ptr<scalar_t>());
    softmax_backward(mix.var_w, d_var_w, mix.first, params.K, grad_var_weight.mutable_data_ptr<scalar_t>());
  });
  return {grad_weight, grad_bias, grad_mean_weight, grad_var_weight, bn_grad};
}

at::Tensor backward_coefficients_cpu(const at::Tensor& grad_moments, const at::Tensor& moments,
                                     const at::Tensor& bn_stats, const c10::optional<at::Tensor>& bn_grad,
                                     const c10::optional<at::Tensor>& weight, const at::Tensor& mean_weight,
                                     const at::Tensor& var_weight, int64_t count, bool has_instance, double eps) {
  const BackwardArgs args(grad_moments, moments, bn_stats, bn_grad, weight, mean_weight, var_weight, has_instance);
  const at::Tensor &mom_t = args.moments, &bn_t = args.bn_stats, &gm_t = args.grad_moments, &bg_t = args.bn_grad;
  const Params& params = args.params;
  const int64_t N = args.N(), C = args.C();
  at::Tensor coef = at::empty({N, C, 3}, mom_t.options());
  AT_DISPATCH_FLOATING_TYPES(mom_t.scalar_type(), "switch_norm_backward_coefficients_cpu", [&] {
    const scalar_t* mom = mom_t.const_data_ptr<scalar_t>();
    const scalar_t* bn = bn_t.const_data_ptr<scalar_t>();
    const scalar_t* gamma = params.gamma.const_data_ptr<scalar_t>();
    const GroupForm<scalar_t> form(has_instance, count);
    const Mixture<scalar_t> mix(params.mean_logits.const_data_ptr<scalar_t>(),
                                params.var_logits.const_data_ptr<scalar_t>(), params.K, has_instance);
    const bool with_bn = mix.has_bn() && bg_t.defined();
    const scalar_t* bg = with_bn ? bg_t.const_data_ptr<scalar_t>() : nullptr;
    const std::vector<scalar_t> ln = layer_stats(mom, N, C, form);
    const BackwardPlanes<scalar_t> planes(mom, gm_t.const_data_ptr<scalar_t>(), gamma, bn, ln, mix, form, N, C,
                                          scalar_t(eps));
    scalar_t* cp = coef.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      scalar_t ln_grad_mean = 0, ln_grad_var = 0;
      for (int64_t c = 0; c < C; ++c) {
        ln_grad_mean += planes.grads[n * C + c].grad_mean;
        ln_grad_var += planes.grads[n * C + c].grad_var;
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = n * C + c;
        plane_input_grad(mix, form, planes.grads[p], gamma[c] * planes.norms[p].rstd, mom[2 * p], scalar_t(C),
                         ln[2 * n], ln_grad_mean, ln_grad_var, with_bn, with_bn ? bn[2 * C + c] : scalar_t(0), bn[c],
                         with_bn ? bg[c] : scalar_t(0), with_bn ? bg[C + c] : scalar_t(0), cp + 3 * p);
      }
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
