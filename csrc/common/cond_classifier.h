// Per-element math of the conditional classifier (CondNet), shared by the CPU and CUDA kernels.
//
// The class softmax runs at every pixel over the K class logits, which lie K rows apart in a (B, K, N)
// guidance tensor. Both devices walk the classes of one pixel in three passes (max, sum of exponentials,
// normalised probabilities), accumulating in `acc_t` (float for fp16/bf16/fp32, double for fp64). The CUDA
// kernel recomputes the exponentials in the last pass (cheaper than storing and re-reading them in global
// memory); the CPU kernel keeps them in a cache-resident block of pixels, and computes the float ones with
// its own vectorizable exp (cpu/cond_classifier.cpp).
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

namespace normkit {
namespace cond_classifier {

// Accumulation type: float for fp16/bf16/fp32, double for fp64.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// Probability of one class given the pixel's maximum logit and the reciprocal of its exponential sum.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t class_probability(acc_t logit, acc_t max_logit, acc_t inv_sum) {
  using std::exp;
  return exp(logit - max_logit) * inv_sum;
}

// Term of the pixel's exponential sum for one class; shifted by the max so it never overflows.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t shifted_exp(acc_t logit, acc_t max_logit) {
  using std::exp;
  return exp(logit - max_logit);
}

// Softmax backward for one class: dG = P * (dP - sum_k P_k dP_k), `dot` being that per-pixel sum.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_input_grad(acc_t prob, acc_t grad_prob, acc_t dot) {
  return prob * (grad_prob - dot);
}

}  // namespace cond_classifier
}  // namespace normkit
