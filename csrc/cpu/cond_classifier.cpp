// CPU kernels of the conditional classifier: the per-pixel class softmax and its backward.
// The GEMM parts and the op bodies are shared with CUDA in common/cond_classifier_ops.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/cond_classifier.h"
#include "common/cond_classifier_ops.h"

namespace normkit {
namespace cond_classifier {
namespace {

// Pixels handled together: their K class rows (K * kPixelBlock values) stay in cache across the three
// passes, and the innermost loops run over contiguous pixels so they vectorize.
constexpr int64_t kPixelBlock = 64;

at::Tensor class_softmax_cpu(const at::Tensor& guidance) {
  auto prob = at::empty_like(guidance);
  const int64_t batch = guidance.size(0), classes = guidance.size(1), pixels = guidance.size(2);
  if (prob.numel() == 0) return prob;
  const int64_t blocks_per_sample = (pixels + kPixelBlock - 1) / kPixelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, guidance.scalar_type(), "class_softmax_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* logits = guidance.const_data_ptr<scalar_t>();
    scalar_t* out = prob.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * blocks_per_sample, 1, [&](int64_t begin, int64_t end) {
      acc_t max_logit[kPixelBlock];
      acc_t inv_sum[kPixelBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t first_pixel = (task % blocks_per_sample) * kPixelBlock;
        const int64_t offset = (task / blocks_per_sample) * classes * pixels + first_pixel;
        const int64_t len = std::min(kPixelBlock, pixels - first_pixel);
        const scalar_t* g = logits + offset;
        scalar_t* p = out + offset;
        std::fill(max_logit, max_logit + len, -std::numeric_limits<acc_t>::infinity());
        std::fill(inv_sum, inv_sum + len, acc_t(0));
        for (int64_t k = 0; k < classes; ++k) {
          for (int64_t j = 0; j < len; ++j) {
            max_logit[j] = std::max(max_logit[j], static_cast<acc_t>(g[k * pixels + j]));
          }
        }
        for (int64_t k = 0; k < classes; ++k) {
          for (int64_t j = 0; j < len; ++j) {
            inv_sum[j] += shifted_exp(static_cast<acc_t>(g[k * pixels + j]), max_logit[j]);
          }
        }
        for (int64_t j = 0; j < len; ++j) inv_sum[j] = acc_t(1) / inv_sum[j];
        for (int64_t k = 0; k < classes; ++k) {
          for (int64_t j = 0; j < len; ++j) {
            const acc_t logit = static_cast<acc_t>(g[k * pixels + j]);
            p[k * pixels + j] = static_cast<scalar_t>(class_probability(logit, max_logit[j], inv_sum[j]));
          }
        }
      }
    });
  });
  return prob;
}

void class_softmax_backward_cpu(const at::Tensor& prob, at::Tensor& grad_prob) {
  const int64_t batch = prob.size(0), classes = prob.size(1), pixels = prob.size(2);
  if (prob.numel() == 0) return;
  TORCH_CHECK(prob.is_contiguous() && grad_prob.is_contiguous(), "class softmax backward needs contiguous buffers");
  const int64_t blocks_per_sample = (pixels + kPixelBlock - 1) / kPixelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prob.scalar_type(), "class_softmax_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* probs = prob.const_data_ptr<scalar_t>();
    scalar_t* grads = grad_prob.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * blocks_per_sample, 1, [&](int64_t begin, int64_t end) {
      acc_t dot[kPixelBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t first_pixel = (task % blocks_per_sample) * kPixelBlock;
        const int64_t offset = (task / blocks_per_sample) * classes * pixels + first_pixel;
        const int64_t len = std::min(kPixelBlock, pixels - first_pixel);
        const scalar_t* p = probs + offset;
        scalar_t* d = grads + offset;
        std::fill(dot, dot + len, acc_t(0));
        for (int64_t k = 0; k < classes; ++k) {
          for (int64_t j = 0; j < len; ++j) {
            dot[j] += static_cast<acc_t>(p[k * pixels + j]) * static_cast<acc_t>(d[k * pixels + j]);
          }
        }
        for (int64_t k = 0; k < classes; ++k) {
          for (int64_t j = 0; j < len; ++j) {
            d[k * pixels + j] = static_cast<scalar_t>(softmax_input_grad(
                static_cast<acc_t>(p[k * pixels + j]), static_cast<acc_t>(d[k * pixels + j]), dot[j]));
          }
        }
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
