// CUDA kernels of the conditional classifier: the per-pixel class softmax and its backward.
// The GEMMs run on cuBLAS through at::baddbmm; the op bodies are shared with the CPU in
// common/cond_classifier_ops.h. One thread owns one pixel and walks its K classes; neighbouring threads
// own neighbouring pixels, so every class row is read coalesced.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cond_classifier.h"
#include "common/cond_classifier_ops.h"

namespace normkit {
namespace cond_classifier {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

int64_t blocks_for(int64_t items) { return std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks); }

template <typename scalar_t>
__global__ void class_softmax_kernel(const scalar_t* __restrict__ logits, scalar_t* __restrict__ prob,
                                     int64_t classes, int64_t pixels, int64_t total_pixels) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total_pixels;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t offset = (idx / pixels) * classes * pixels + idx % pixels;
    const scalar_t* g = logits + offset;
    scalar_t* p = prob + offset;
    acc_t max_logit = -INFINITY;
    for (int64_t k = 0; k < classes; ++k) max_logit = ::max(max_logit, static_cast<acc_t>(g[k * pixels]));
    acc_t sum = 0;
    for (int64_t k = 0; k < classes; ++k) sum += shifted_exp(static_cast<acc_t>(g[k * pixels]), max_logit);
    const acc_t inv_sum = acc_t(1) / sum;
    for (int64_t k = 0; k < classes; ++k) {
      p[k * pixels] = static_cast<scalar_t>(class_probability(static_cast<acc_t>(g[k * pixels]), max_logit, inv_sum));
    }
  }
}

template <typename scalar_t>
__global__ void class_softmax_backward_kernel(const scalar_t* __restrict__ prob, scalar_t* __restrict__ grad,
                                              int64_t classes, int64_t pixels, int64_t total_pixels) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total_pixels;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t offset = (idx / pixels) * classes * pixels + idx % pixels;
    const scalar_t* p = prob + offset;
    scalar_t* d = grad + offset;
    acc_t dot = 0;
    for (int64_t k = 0; k < classes; ++k) dot += static_cast<acc_t>(p[k * pixels]) * static_cast<acc_t>(d[k * pixels]);
    for (int64_t k = 0; k < classes; ++k) {
      d[k * pixels] = static_cast<scalar_t>(
          softmax_input_grad(static_cast<acc_t>(p[k * pixels]), static_cast<acc_t>(d[k * pixels]), dot));
    }
  }
}

at::Tensor class_softmax_cuda(const at::Tensor& guidance) {
  const c10::cuda::CUDAGuard device_guard(guidance.device());
  auto prob = at::empty_like(guidance);
  if (prob.numel() == 0) return prob;
  const int64_t classes = guidance.size(1), pixels = guidance.size(2);
  const int64_t total_pixels = guidance.size(0) * pixels;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, guidance.scalar_type(), "class_softmax_cuda", [&] {
    class_softmax_kernel<scalar_t><<<blocks_for(total_pixels), kThreads, 0, stream>>>(
        guidance.const_data_ptr<scalar_t>(), prob.mutable_data_ptr<scalar_t>(), classes, pixels, total_pixels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return prob;
}

void class_softmax_backward_cuda(const at::Tensor& prob, at::Tensor& grad_prob) {
  const c10::cuda::CUDAGuard device_guard(prob.device());
  if (prob.numel() == 0) return;
  TORCH_CHECK(prob.is_contiguous() && grad_prob.is_contiguous(), "class softmax backward needs contiguous buffers");
  const int64_t classes = prob.size(1), pixels = prob.size(2);
  const int64_t total_pixels = prob.size(0) * pixels;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prob.scalar_type(), "class_softmax_backward_cuda", [&] {
    class_softmax_backward_kernel<scalar_t><<<blocks_for(total_pixels), kThreads, 0, stream>>>(
        prob.const_data_ptr<scalar_t>(), grad_prob.mutable_data_ptr<scalar_t>(), classes, pixels, total_pixels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor class_embedding_cuda(const at::Tensor& guidance, const at::Tensor& features) {
  const c10::cuda::CUDAGuard device_guard(features.device());
  return class_embedding(guidance, features, &class_softmax_cuda, &library_batched_gemm);
}

std::tuple<at::Tensor, at::Tensor> class_embedding_backward_cuda(const at::Tensor& grad_embedding,
                                                                 const at::Tensor& guidance,
                                                                 const at::Tensor& features) {
  const c10::cuda::CUDAGuard device_guard(features.device());
  return class_embedding_backward(grad_embedding, guidance, features, &class_softmax_cuda,
                                  &class_softmax_backward_cuda, &library_batched_gemm);
}

at::Tensor dynamic_classify_cuda(const at::Tensor& features, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard device_guard(features.device());
  return dynamic_classify(features, weight, bias, &library_batched_gemm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_classify_backward_cuda(const at::Tensor& grad_output,
                                                                              const at::Tensor& features,
                                                                              const at::Tensor& weight,
                                                                              bool has_bias) {
  const c10::cuda::CUDAGuard device_guard(features.device());
  return dynamic_classify_backward(grad_output, features, weight, has_bias, &library_batched_gemm);
}

}  // namespace
}  // namespace cond_classifier
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CUDA, m) {
  m.impl("class_embedding", &normkit::cond_classifier::class_embedding_cuda);
  m.impl("_class_embedding_backward", &normkit::cond_classifier::class_embedding_backward_cuda);
  m.impl("dynamic_classify", &normkit::cond_classifier::dynamic_classify_cuda);
  m.impl("_dynamic_classify_backward", &normkit::cond_classifier::dynamic_classify_backward_cuda);
}
