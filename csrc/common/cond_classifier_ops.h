// Host-side composition of the conditional-classifier ops, shared by the CPU and CUDA registrations.
//
// The contractions (class embedding E = P·Xᵀ/N, its gradients, and the per-sample classification
// Y = W·X + b) run as batched GEMMs; the batched GEMM, the class softmax and its backward are the device
// parts, passed in as function pointers (CUDA: cuBLAS through at::baddbmm; CPU: one single-threaded
// GEMM per sample and output tile, see cpu/batched_gemm.h).
// The 1/N mean is applied as the GEMM's alpha so fp16/bf16 sums over N pixels are scaled inside the fp32
// accumulator instead of overflowing the output type first.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <tuple>

namespace normkit {
namespace cond_classifier {

// guidance (B, K, N) contiguous -> class probabilities (B, K, N), softmax over K at every pixel.
using SoftmaxForward = at::Tensor (*)(const at::Tensor& guidance);
// In place: grad_prob (B, K, N) becomes the guidance gradient, given the probabilities (B, K, N).
using SoftmaxBackward = void (*)(const at::Tensor& prob, at::Tensor& grad_prob);

// out[b] = alpha * a[b]·m[b] (+ addend[b], broadcast to out, when it is defined) for every sample b.
using BatchedGemm = void (*)(const at::Tensor& out, const at::Tensor& addend, const at::Tensor& a, const at::Tensor& m,
                             double alpha);

// The BatchedGemm of one library call (at::baddbmm).
inline void library_batched_gemm(const at::Tensor& out, const at::Tensor& addend, const at::Tensor& a,
                                 const at::Tensor& m, double alpha) {
  at::Tensor result = out;
  if (addend.defined()) {
    at::baddbmm_out(result, addend.expand_as(out), a, m, /*beta=*/1, alpha);
  } else {
    at::baddbmm_out(result, result, a, m, /*beta=*/0, alpha);
  }
}

// Features stored channels_last are read as (B, N, C) rows; results then keep that layout.
// The GEMMs inside the ops run in the inputs' dtype: an autocast region around a call would otherwise reach them
// (a kernel's own ATen calls still pass the Autocast keys) and return, say, bf16 logits for fp32 inputs, whose
// gradient then fails the backward's dtype check.
using NoAutocastGuard = c10::impl::ExcludeDispatchKeyGuard;

inline bool uses_channels_last(const at::Tensor& features) {
  return features.dim() == 4 && !features.is_contiguous() &&
         features.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// (B, N, C) GEMM result -> (B, C, H, W) view in channels_last layout.
inline at::Tensor pixel_rows_to_nchw(const at::Tensor& rows, int64_t height, int64_t width) {
  return rows.view({rows.size(0), height, width, rows.size(2)}).permute({0, 3, 1, 2});
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* a_name, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

// The ops' dtypes (the other tensors must match features).
inline void check_float_features(const at::Tensor& features) {
  const auto dtype = features.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "features must be float16, bfloat16, float32 or float64, got ", dtype);
}

inline void check_class_embedding_inputs(const at::Tensor& guidance, const at::Tensor& features) {
  check_float_features(features);
  TORCH_CHECK(guidance.dim() == 4, "guidance must be Tensor[B, K, H, W], got ", guidance.sizes());
  TORCH_CHECK(features.dim() == 4, "features must be Tensor[B, C, H, W], got ", features.sizes());
  TORCH_CHECK(guidance.size(0) == features.size(0) && guidance.size(2) == features.size(2) &&
                  guidance.size(3) == features.size(3),
              "guidance ", guidance.sizes(), " and features ", features.sizes(),
              " must share batch size and spatial size");
  TORCH_CHECK(features.size(2) * features.size(3) > 0, "class_embedding needs a non-empty spatial size, got ",
              features.sizes());
  check_same(guidance, features, "guidance", "features");
}

inline at::Tensor class_embedding(const at::Tensor& guidance, const at::Tensor& features, SoftmaxForward softmax,
                                  BatchedGemm gemm) {
  const NoAutocastGuard no_autocast(c10::autocast_dispatch_keyset);
  check_class_embedding_inputs(guidance, features);
  const int64_t batch = features.size(0), channels = features.size(1), classes = guidance.size(1);
  const int64_t pixels = features.size(2) * features.size(3);
  auto embedding = at::empty({batch, classes, channels}, features.options());
  if (embedding.numel() == 0) return embedding.zero_();
  const auto prob = softmax(guidance.reshape({batch, classes, pixels}).contiguous());
  const auto feature_rows = features.reshape({batch, channels, pixels}).transpose(1, 2);  // (B, N, C)
  gemm(embedding, {}, prob, feature_rows, 1.0 / pixels);
  return embedding;
}

inline std::tuple<at::Tensor, at::Tensor> class_embedding_backward(const at::Tensor& grad_embedding,
                                                                   const at::Tensor& guidance,
                                                                   const at::Tensor& features,
                                                                   SoftmaxForward softmax,
                                                                   SoftmaxBackward softmax_backward,
                                                                   BatchedGemm gemm) {
  const NoAutocastGuard no_autocast(c10::autocast_dispatch_keyset);
  check_class_embedding_inputs(guidance, features);
  const int64_t batch = features.size(0), channels = features.size(1), classes = guidance.size(1);
  const int64_t height = features.size(2), width = features.size(3), pixels = height * width;
  TORCH_CHECK(grad_embedding.sizes() == at::IntArrayRef({batch, classes, channels}),
              "grad_embedding must be Tensor[", batch, ", ", classes, ", ", channels, "], got ",
              grad_embedding.sizes());
  check_same(grad_embedding, features, "grad_embedding", "features");
  const bool channels_last = uses_channels_last(features);
  const double scale = 1.0 / pixels;

  if (grad_embedding.numel() == 0) {
    return {at::zeros(guidance.sizes(), guidance.options()), at::zeros_like(features)};
  }
  // The probabilities are recomputed here rather than saved by the forward: (B, K, N) is the largest
  // tensor of the op, and recomputing it costs one pass over the guidance logits.
  const auto prob = softmax(guidance.reshape({batch, classes, pixels}).contiguous());
  const auto feature_cols = features.reshape({batch, channels, pixels});  // (B, C, N)

  at::Tensor grad_features;
  if (channels_last) {
    auto rows = at::empty({batch, pixels, channels}, features.options());
    gemm(rows, {}, prob.transpose(1, 2), grad_embedding, scale);
    grad_features = pixel_rows_to_nchw(rows, height, width);
  } else {
    auto cols = at::empty({batch, channels, pixels}, features.options());
    gemm(cols, {}, grad_embedding.transpose(1, 2), prob, scale);
    grad_features = cols.view({batch, channels, height, width});
  }

  auto grad_guidance = at::empty({batch, classes, pixels}, guidance.options());
  gemm(grad_guidance, {}, grad_embedding, feature_cols, scale);  // dL/dP
  softmax_backward(prob, grad_guidance);
  return {grad_guidance.view({batch, classes, height, width}), grad_features};
}

inline void check_dynamic_classify_inputs(const at::Tensor& features, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias) {
  check_float_features(features);
  TORCH_CHECK(features.dim() == 4, "features must be Tensor[B, C, H, W], got ", features.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == features.size(0) && weight.size(2) == features.size(1),
              "weight must be Tensor[B, K, C] = [", features.size(0), ", K, ", features.size(1), "], got ",
              weight.sizes());
  check_same(features, weight, "features", "weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == weight.size(0) && bias->size(1) == weight.size(1),
                "bias must be Tensor[B, K] = [", weight.size(0), ", ", weight.size(1), "], got ", bias->sizes());
    check_same(features, *bias, "features", "bias");
  }
}

inline at::Tensor dynamic_classify(const at::Tensor& features, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, BatchedGemm gemm) {
  const NoAutocastGuard no_autocast(c10::autocast_dispatch_keyset);
  check_dynamic_classify_inputs(features, weight, bias);
  const int64_t batch = features.size(0), channels = features.size(1), classes = weight.size(1);
  const int64_t height = features.size(2), width = features.size(3), pixels = height * width;
  if (uses_channels_last(features)) {
    // (B, N, C) · (B, C, K) -> (B, N, K): the logits come out channels_last like the features.
    auto rows = at::empty({batch, pixels, classes}, features.options());
    gemm(rows, bias.has_value() ? bias->unsqueeze(1) : at::Tensor(),
         features.reshape({batch, channels, pixels}).transpose(1, 2), weight.transpose(1, 2), 1.0);
    return pixel_rows_to_nchw(rows, height, width);
  }
  auto cols = at::empty({batch, classes, pixels}, features.options());
  gemm(cols, bias.has_value() ? bias->unsqueeze(2) : at::Tensor(), weight, features.reshape({batch, channels, pixels}),
       1.0);
  return cols.view({batch, classes, height, width});
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_classify_backward(const at::Tensor& grad_output,
                                                                                const at::Tensor& features,
                                                                                const at::Tensor& weight,
                                                                                bool has_bias, BatchedGemm gemm) {
  const NoAutocastGuard no_autocast(c10::autocast_dispatch_keyset);
  check_dynamic_classify_inputs(features, weight, std::nullopt);
  const int64_t batch = features.size(0), channels = features.size(1), classes = weight.size(1);
  const int64_t height = features.size(2), width = features.size(3), pixels = height * width;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({batch, classes, height, width}),
              "grad_output must be Tensor[", batch, ", ", classes, ", ", height, ", ", width, "], got ",
              grad_output.sizes());
  check_same(grad_output, features, "grad_output", "features");
  const auto grad_cols = grad_output.reshape({batch, classes, pixels});  // (B, K, N)
  const auto feature_cols = features.reshape({batch, channels, pixels});
  auto grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  gemm(grad_weight, {}, grad_cols, feature_cols.transpose(1, 2), 1.0);
  at::Tensor grad_features;
  if (uses_channels_last(features)) {
    auto rows = at::empty({batch, pixels, channels}, features.options());
    gemm(rows, {}, grad_cols.transpose(1, 2), weight, 1.0);
    grad_features = pixel_rows_to_nchw(rows, height, width);
  } else {
    auto cols = at::empty({batch, channels, pixels}, features.options());
    gemm(cols, {}, weight.transpose(1, 2), grad_cols, 1.0);
    grad_features = cols.view({batch, channels, height, width});
  }
  const auto grad_bias = has_bias ? grad_cols.sum(2) : at::zeros({batch, classes}, weight.options());
  return {grad_features, grad_weight, grad_bias};
}

}  // namespace cond_classifier
}  // namespace normkit
