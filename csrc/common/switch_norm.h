// Switchable Normalization math shared by the CPU and CUDA kernels (per-(n, c), per-n and per-c pieces).
//
// Everything is expressed through per-(n, c) moments of the input: mean mu and M2 = sum (x - mu)^2 over the
// L spatial elements. A statistic over a *group* of G (n, c) entries (LN: the C channels of a sample,
// BN: the N samples of a channel) is
//     group mean = (1/G) sum_m mu_m
//     group var  = sum_m (A * M2_m + B * (mu_m - group mean)^2) / D(G)
// which reproduces both official definitions:
//   - SwitchNorm2d/3d ("instance" mode, IN/LN/BN): var_in = M2 / (L - 1) is unbiased, and LN/BN variances are
//     mean_g(var_in + mu^2) - mean^2 = (1/G) sum (var_in + (mu - mean)^2): A = 1/(L-1), B = 1, D = G.
//   - SwitchNorm1d ("pooled" mode, LN/BN): the unbiased variance of all G*L elements: A = 1, B = L, D = G*L - 1.
// The shifted form (mu - mean)^2 avoids the cancellation of the official E[x^2] - E[x]^2.
// With L = 1 the official unbiased var_in is NaN; normkit clamps L - 1 to 1 (var_in = 0), a documented deviation.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace normkit {
namespace switch_norm {

template <typename T>
struct GroupForm {
  T within;     // A: weight of a member's M2
  T between;    // B: weight of a member's squared mean deviation
  T in_within;  // IN variance per M2: A in instance mode, 0 in pooled mode (no IN), so that IN terms need no branch
  T offset;     // D(G) = max(G * B - offset, 1): offset 0 in instance mode (D = G), 1 in pooled mode (G * L - 1)
  int64_t count;  // L

  C10_HOST_DEVICE GroupForm(bool has_instance, int64_t L)
      : within(has_instance ? T(1) / T(L > 1 ? L - 1 : 1) : T(1)),
        between(has_instance ? T(1) : T(L)),
        in_within(has_instance ? within : T(0)),
        offset(has_instance ? T(0) : T(1)),
        count(L) {}

  // D(G) for a group of `members` entries (a real number so that synchronized counts can be fractional-free floats).
  // Branch-free, so that loops over planes vectorize on CPU.
  C10_HOST_DEVICE T denominator(T members) const {
    const T d = members * between - offset;
    return d > T(1) ? d : T(1);
  }
  // Contribution of one member to the numerator of the group variance.
  C10_HOST_DEVICE T member_term(T mu, T m2, T group_mean) const {
    const T dev = mu - group_mean;
    return within * m2 + between * dev * dev;
  }
};

// Mixture weights (softmax of the logits) laid out as [IN, LN, BN]; absent components get weight 0.
// Logit order: instance mode [IN, LN(, BN)], pooled mode [LN(, BN)].
template <typename T>
struct Mixture {
  T mean_w[3];
  T var_w[3];
  int first;  // index of the first present component (0 in instance mode, 1 in pooled mode)
  int num;    // number of components present

  C10_HOST_DEVICE static void softmax(const T* logits, int k, T* out) {
    T m = logits[0];
    for (int i = 1; i < k; ++i) m = logits[i] > m ? logits[i] : m;
    T s = T(0);
    using std::exp;
    for (int i = 0; i < k; ++i) {
      out[i] = exp(logits[i] - m);
      s += out[i];
    }
    for (int i = 0; i < k; ++i) out[i] /= s;
  }

  C10_HOST_DEVICE Mixture(const T* mean_logits, const T* var_logits, int k, bool has_instance)
      : first(has_instance ? 0 : 1), num(k) {
    T mw[3], vw[3];
    softmax(mean_logits, k, mw);
    softmax(var_logits, k, vw);
    for (int i = 0; i < 3; ++i) {
      const int j = i - first;
      const bool present = j >= 0 && j < k;
      mean_w[i] = present ? mw[j] : T(0);
      var_w[i] = present ? vw[j] : T(0);
    }
  }
  C10_HOST_DEVICE bool has_bn() const { return first + num == 3; }
};

// Gradient of the loss w.r.t. the softmax logits, given the gradient w.r.t. the (present) weights.
template <typename T>
C10_HOST_DEVICE inline void softmax_backward(const T* weights3, const T* grad_weights3, int first, int k,
                                             T* grad_logits) {
  T dot = T(0);
  for (int j = 0; j < k; ++j) dot += weights3[first + j] * grad_weights3[first + j];
  for (int j = 0; j < k; ++j) grad_logits[j] = weights3[first + j] * (grad_weights3[first + j] - dot);
}

// Per-(n, c) normalisation: mixed mean and variance -> y = scale * x + shift.
template <typename T>
struct Normalizer {
  T mean, var, rstd;

  C10_HOST_DEVICE Normalizer(const Mixture<T>& mix, const GroupForm<T>& form, T mu, T m2, T ln_mean, T ln_var,
                             T bn_mean, T bn_var, T eps) {
    const T in_var = form.in_within * m2;
    mean = mix.mean_w[0] * mu + mix.mean_w[1] * ln_mean + mix.mean_w[2] * bn_mean;
    var = mix.var_w[0] * in_var + mix.var_w[1] * ln_var + mix.var_w[2] * bn_var;
    using std::sqrt;  // the float overload for float (a bare ::sqrt computes in double)
    rstd = T(1) / sqrt(var + eps);
  }
};

// Backward, per (n, c): from the sums of dy and dy*x over the plane to the gradients w.r.t. the mixed mean and
// variance, and to the weight and bias.
template <typename T>
struct PlaneGrad {
  T grad_mean;   // dL/d(mixed mean)
  T grad_var;    // dL/d(mixed var)
  T grad_gamma;  // contribution to dL/d(weight[c])

  C10_HOST_DEVICE PlaneGrad(const Normalizer<T>& nz, T gamma, T sum_dy, T sum_dy_x) {
    const T centered = sum_dy_x - nz.mean * sum_dy;  // sum dy * (x - mean)
    grad_gamma = nz.rstd * centered;
    grad_mean = -gamma * nz.rstd * sum_dy;
    grad_var = T(-0.5) * gamma * nz.rstd * nz.rstd * nz.rstd * centered;
  }
};

// Gradient w.r.t. one plane's moments (mu, M2). Returned by value, never through references, so that CPU loops
// over planes vectorize.
template <typename T>
struct MomentGrad {
  T d_mu, d_m2;
};

// Gradient of a group statistic w.r.t. one member's (mu, M2).
template <typename T>
C10_HOST_DEVICE inline MomentGrad<T> group_backward(const GroupForm<T>& form, T members, T mean_weight, T var_weight,
                                                    T group_grad_mean, T group_grad_var, T mu, T group_mean) {
  // Reciprocals first: for the IN and LN groups (members 1 and C) they are loop-invariant, so CPU loops over planes
  // hoist them and multiply instead of dividing per plane.
  const T inv_members = T(1) / members;
  const T inv_d = T(1) / form.denominator(members);
  return {mean_weight * group_grad_mean * inv_members +
              var_weight * group_grad_var * T(2) * form.between * (mu - group_mean) * inv_d,
          var_weight * group_grad_var * form.within * inv_d};
}

// dx = c1 * dy + c2 * x + c3 for the plane, from the gradients w.r.t. its moments (mu, M2).
template <typename T>
C10_HOST_DEVICE inline void input_grad_coefficients(T gamma_rstd, T d_mu, T d_m2, T mu, int64_t L, T* coef) {
  coef[0] = gamma_rstd;
  coef[1] = T(2) * d_m2;
  coef[2] = d_mu * (T(1) / T(L)) - coef[1] * mu;
}

// Forward coefficients of one plane: y = scale * x + shift.
template <typename T>
C10_HOST_DEVICE inline void plane_coefficients(const Normalizer<T>& nz, T gamma, T beta, T* coef) {
  const T scale = gamma * nz.rstd;
  coef[0] = scale;
  coef[1] = beta - nz.mean * scale;
}

// Adds one plane's contribution to the gradients w.r.t. the mixture weights (before the softmax backward): the
// three [IN, LN, BN] terms of each go to d_mean_w[i * stride] and d_var_w[i * stride].
template <typename T>
C10_HOST_DEVICE inline void accumulate_mixture_grads(const PlaneGrad<T>& g, const GroupForm<T>& form, T mu, T m2,
                                                     T ln_mean, T ln_var, T bn_mean, T bn_var, T* d_mean_w, T* d_var_w,
                                                     int64_t stride = 1) {
  d_mean_w[0] += g.grad_mean * mu;
  d_mean_w[stride] += g.grad_mean * ln_mean;
  d_mean_w[2 * stride] += g.grad_mean * bn_mean;
  d_var_w[0] += g.grad_var * form.in_within * m2;
  d_var_w[stride] += g.grad_var * ln_var;
  d_var_w[2 * stride] += g.grad_var * bn_var;
}

// Input-gradient coefficients of one plane from its own gradient and the reduced LN (and, when the BN statistics
// came from the batch, BN) group gradients.
template <typename T>
C10_HOST_DEVICE inline void plane_input_grad(const Mixture<T>& mix, const GroupForm<T>& form, const PlaneGrad<T>& g,
                                             T gamma_rstd, T mu, T channels, T ln_mean, T ln_grad_mean, T ln_grad_var,
                                             bool with_bn, T bn_members, T bn_mean, T bn_grad_mean, T bn_grad_var,
                                             T* coef) {
  // IN, a group of one; without IN (pooled mode) its mixture weights are 0 and the terms vanish, with no branch.
  const MomentGrad<T> in = group_backward(form, T(1), mix.mean_w[0], mix.var_w[0], g.grad_mean, g.grad_var, mu, mu);
  const MomentGrad<T> ln =
      group_backward(form, channels, mix.mean_w[1], mix.var_w[1], ln_grad_mean, ln_grad_var, mu, ln_mean);
  T d_mu = in.d_mu + ln.d_mu, d_m2 = in.d_m2 + ln.d_m2;
  if (with_bn) {
    const MomentGrad<T> bn =
        group_backward(form, bn_members, mix.mean_w[2], mix.var_w[2], bn_grad_mean, bn_grad_var, mu, bn_mean);
    d_mu += bn.d_mu;
    d_m2 += bn.d_m2;
  }
  input_grad_coefficients(gamma_rstd, d_mu, d_m2, mu, form.count, coef);
}

}  // namespace switch_norm
}  // namespace normkit
