// CPU kernels of the conditional classifier: the per-pixel class softmax and its backward.
// The GEMM parts and the op bodies are shared with CUDA in common/cond_classifier_ops.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cond_classifier.h"
#include "common/cond_classifier_ops.h"

namespace normkit {
namespace cond_classifier {
namespace {

// Pixels per task: the largest multiple of 16 whose K class values (as acc_t) fit in kBlockBytes, so a block
// stays in L2 across the softmax passes while its rows (N values apart in memory) are read in long runs.
constexpr int64_t kBlockBytes = 128 * 1024;
constexpr int64_t kMinPixelBlock = 16;

template <typename acc_t>
int64_t pixel_block(int64_t classes, int64_t pixels) {
  const int64_t fit = kBlockBytes / (classes * static_cast<int64_t>(sizeof(acc_t))) / kMinPixelBlock * kMinPixelBlock;
  return std::min(std::max(fit, kMinPixelBlock), pixels);
}

// exp(x) for x in [-100, 0], in plain arithmetic so that loops over it vectorize: std::exp is a scalar libm
// call (the extension targets the SSE2 baseline, without a vector math library). Cody-Waite reduction
// x = n ln2 + r with |r| <= ln2/2, Cephes' expf polynomial for exp(r), and 2^n written into the exponent
// bits; within 1 ulp of exp(x) on [-87, 0] (checked over every float). Below x = -87.7, where exp(x) would
// be subnormal, the exponent clamps at 0 and the result is 0. NaN stays NaN.
inline float exp_nonpositive(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const float t = x * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const int32_t biased_exponent = std::max(c10::bit_cast<int32_t>(t) - c10::bit_cast<int32_t>(kRound) + 127, 0);
  const float two_to_n = c10::bit_cast<float>(static_cast<uint32_t>(biased_exponent) << 23);
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;  // ln2 split in two: n * 0.693359375f is exact
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  return y * two_to_n;
}

// One class row of a block: e[j] = exp(e[j] - max_logit[j]), added into sum[j].
inline void exp_row(float* e, const float* max_logit, float* sum, int64_t len) {
  // The floor keeps exp_nonpositive in its range (-inf logits give 0). It is a loop of its own: fused with
  // the exponential, GCC turns the floored lanes into a branch and leaves the loop scalar.
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) e[j] = std::max(e[j] - max_logit[j], -100.0f);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    e[j] = exp_nonpositive(e[j]);
    sum[j] += e[j];
  }
}

inline void exp_row(double* e, const double* max_logit, double* sum, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    e[j] = shifted_exp(e[j], max_logit[j]);
    sum[j] += e[j];
  }
}

// Softmax over the K rows (`stride` apart) of `len` pixels. The rows are copied into the contiguous `exps`
// (K * len values) as acc_t, where each exponential is computed once and kept until the normalisation, which
// thus rounds to scalar_t only once. `max_logit` and `inv_sum` hold len values.
template <typename scalar_t, typename acc_t>
void softmax_block(const scalar_t* g, scalar_t* p, int64_t classes, int64_t stride, int64_t len, acc_t* exps,
                   acc_t* max_logit, acc_t* inv_sum) {
  std::fill(max_logit, max_logit + len, -std::numeric_limits<acc_t>::infinity());
  for (int64_t k = 0; k < classes; ++k) {
    const scalar_t* g_row = g + k * stride;
    acc_t* e_row = exps + k * len;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      e_row[j] = static_cast<acc_t>(g_row[j]);
      max_logit[j] = std::max(max_logit[j], e_row[j]);
    }
  }
  std::fill(inv_sum, inv_sum + len, acc_t(0));
  for (int64_t k = 0; k < classes; ++k) exp_row(exps + k * len, max_logit, inv_sum, len);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) inv_sum[j] = acc_t(1) / inv_sum[j];
  for (int64_t k = 0; k < classes; ++k) {
    const acc_t* e_row = exps + k * len;
    scalar_t* p_row = p + k * stride;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) p_row[j] = static_cast<scalar_t>(e_row[j] * inv_sum[j]);
  }
}

// In place: the K rows of `d` (dL/dP, `stride` apart) of `len` pixels become dL/dG. `dot` holds len values.
template <typename scalar_t, typename acc_t>
void softmax_backward_block(const scalar_t* p, scalar_t* d, int64_t classes, int64_t stride, int64_t len,
                            acc_t* dot) {
  std::fill(dot, dot + len, acc_t(0));
  for (int64_t k = 0; k < classes; ++k) {
    const scalar_t* p_row = p + k * stride;
    const scalar_t* d_row = d + k * stride;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) dot[j] += static_cast<acc_t>(p_row[j]) * static_cast<acc_t>(d_row[j]);
  }
  for (int64_t k = 0; k < classes; ++k) {
    const scalar_t* p_row = p + k * stride;
    scalar_t* d_row = d + k * stride;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      d_row[j] = static_cast<scalar_t>(
          softmax_input_grad(static_cast<acc_t>(p_row[j]), static_cast<acc_t>(d_row[j]), dot[j]));
    }
  }
}

at::Tensor class_softmax_cpu(const at::Tensor& guidance) {
  auto prob = at::empty_like(guidance);
  const int64_t batch = guidance.size(0), classes = guidance.size(1), pixels = guidance.size(2);
  if (prob.numel() == 0) return prob;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, guidance.scalar_type(), "class_softmax_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t block = pixel_block<acc_t>(classes, pixels);
    const int64_t blocks_per_sample = (pixels + block - 1) / block;
    const scalar_t* logits = guidance.const_data_ptr<scalar_t>();
    scalar_t* out = prob.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * blocks_per_sample, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> exps(classes * block), max_logit(block), inv_sum(block);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t first_pixel = (task % blocks_per_sample) * block;
        const int64_t offset = (task / blocks_per_sample) * classes * pixels + first_pixel;
        softmax_block(logits + offset, out + offset, classes, pixels, std::min(block, pixels - first_pixel),
                      exps.data(), max_logit.data(), inv_sum.data());
      }
    });
  });
  return prob;
}

void class_softmax_backward_cpu(const at::Tensor& prob, at::Tensor& grad_prob) {
  const int64_t batch = prob.size(0), classes = prob.size(1), pixels = prob.size(2);
  if (prob.numel() == 0) return;
  TORCH_CHECK(prob.is_contiguous() && grad_prob.is_contiguous(), "class softmax backward needs contiguous buffers");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prob.scalar_type(), "class_softmax_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t block = pixel_block<acc_t>(classes, pixels);
    const int64_t blocks_per_sample = (pixels + block - 1) / block;
    const scalar_t* probs = prob.const_data_ptr<scalar_t>();
    scalar_t* grads = grad_prob.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * blocks_per_sample, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dot(block);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t first_pixel = (task % blocks_per_sample) * block;
        const int64_t offset = (task / blocks_per_sample) * classes * pixels + first_pixel;
        softmax_backward_block(probs + offset, grads + offset, classes, pixels,
                               std::min(block, pixels - first_pixel), dot.data());
      }
    });
  });
}

at::Tensor class_embedding_cpu(const at::Tensor& guidance, const at::Tensor& features) {
  return class_embedding(guidance, features, &class_softmax_cpu);
}

std::tuple<at::Tensor, at::Tensor> class_embedding_backward_cpu(const at::Tensor& grad_embedding,
                                                                const at::Tensor& guidance,
                                                                const at::Tensor& features) {
  return class_embedding_backward(grad_embedding, guidance, features, &class_softmax_cpu, &class_softmax_backward_cpu);
}

}  // namespace
}  // namespace cond_classifier
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("class_embedding", &normkit::cond_classifier::class_embedding_cpu);
  m.impl("_class_embedding_backward", &normkit::cond_classifier::class_embedding_backward_cpu);
  m.impl("dynamic_classify", &normkit::cond_classifier::dynamic_classify);
  m.impl("_dynamic_classify_backward", &normkit::cond_classifier::dynamic_classify_backward);
}
