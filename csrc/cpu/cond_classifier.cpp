// CPU kernels of the conditional classifier: the per-pixel class softmax and its backward; the GEMMs run on
// cpu/batched_gemm.h. The op bodies are shared with CUDA in common/cond_classifier_ops.h.
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
#include "cpu/batched_gemm.h"
#include "cpu/isa.h"

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

// The per-block loops, built for the x86-64 baseline and for AVX2+FMA; NORMKIT_BEST_ISA picks one at run time.
#define NORMKIT_ISA_SOURCE "cpu/cond_classifier_blocks.inc"
#include "cpu/isa_builds.h"

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
        const int64_t len = std::min(block, pixels - first_pixel);
        NORMKIT_BEST_ISA(softmax_block<scalar_t, acc_t>)(logits + offset, out + offset, classes, pixels, len,
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
        const int64_t len = std::min(block, pixels - first_pixel);
        NORMKIT_BEST_ISA(softmax_backward_block<scalar_t, acc_t>)(probs + offset, grads + offset, classes, pixels,
                                                                  len, dot.data());
      }
    });
  });
}

// The ops' BatchedGemm: tiles on the intra-op threads where they fill them, else the library's batched GEMM.
void batched_gemm_cpu(const at::Tensor& out, const at::Tensor& addend, const at::Tensor& a, const at::Tensor& m,
                      double alpha) {
  if (!cpu::tiled_batched_gemm(out, addend, a, m, alpha)) library_batched_gemm(out, addend, a, m, alpha);
}

at::Tensor class_embedding_cpu(const at::Tensor& guidance, const at::Tensor& features) {
  return class_embedding(guidance, features, &class_softmax_cpu, &batched_gemm_cpu);
}

std::tuple<at::Tensor, at::Tensor> class_embedding_backward_cpu(const at::Tensor& grad_embedding,
                                                                const at::Tensor& guidance,
                                                                const at::Tensor& features) {
  return class_embedding_backward(grad_embedding, guidance, features, &class_softmax_cpu, &class_softmax_backward_cpu,
                                  &batched_gemm_cpu);
}

at::Tensor dynamic_classify_cpu(const at::Tensor& features, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  return dynamic_classify(features, weight, bias, &batched_gemm_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_classify_backward_cpu(const at::Tensor& grad_output,
                                                                             const at::Tensor& features,
                                                                             const at::Tensor& weight, bool has_bias) {
  return dynamic_classify_backward(grad_output, features, weight, has_bias, &batched_gemm_cpu);
}

}  // namespace
}  // namespace cond_classifier
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("class_embedding", &normkit::cond_classifier::class_embedding_cpu);
  m.impl("_class_embedding_backward", &normkit::cond_classifier::class_embedding_backward_cpu);
  m.impl("dynamic_classify", &normkit::cond_classifier::dynamic_classify_cpu);
  m.impl("_dynamic_classify_backward", &normkit::cond_classifier::dynamic_classify_backward_cpu);
}
