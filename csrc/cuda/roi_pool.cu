// RoIPool forward and backward on CUDA. Geometry: csrc/common/roi_geometry.h (shared with CPU).
// The input is read as NCHW (channels_last is made contiguous first). Forward: one thread per output element.
// Backward: each output's gradient goes to its argmax cell with atomicAdd into an fp32/fp64 buffer; the
// summation order of overlapping RoIs varies, so it reports itself as nondeterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/roi_checks.h"
#include "common/roi_geometry.h"
#include "cuda/roi_launch.cuh"

namespace normkit {
namespace {

using roi_cuda::global_thread_count;
using roi_cuda::global_thread_index;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ rois, int64_t total,
                               int batch, int channels, int height, int width, int pooled_h, int pooled_w,
                               at::opmath_type<scalar_t> spatial_scale, scalar_t* __restrict__ output,
                               int32_t* __restrict__ argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = global_thread_index(); index < total; index += global_thread_count()) {
    const int pw = int(index % pooled_w);
    const int ph = int((index / pooled_w) % pooled_h);
    const int c = int((index / pooled_w / pooled_h) % channels);
    const int64_t k = index / pooled_w / pooled_h / channels;
    const scalar_t* roi = rois + k * 5;
    const int batch_index = roi::roi_batch_index(acc_t(roi[0]), batch);
    const acc_t box[4] = {acc_t(roi[1]), acc_t(roi[2]), acc_t(roi[3]), acc_t(roi[4])};
    const auto r = roi::pool_region<acc_t>(box, spatial_scale, pooled_h, pooled_w);
    int h0, h1, w0, w1;
    roi::pool_bin_range(r.start_h, r.bin_h, ph, height, h0, h1);
    roi::pool_bin_range(r.start_w, r.bin_w, pw, width, w0, w1);
    if (batch_index < 0 || !r.valid || h1 <= h0 || w1 <= w0) {
      output[index] = scalar_t(0);
      argmax[index] = -1;
      continue;
    }
    const scalar_t* src = input + (int64_t(batch_index) * channels + c) * height * width;
    acc_t best_val;
    argmax[index] = int32_t(roi::bin_argmax(src, width, h0, h1, w0, w1, best_val));  // < plane
    output[index] = scalar_t(best_val);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rois,
                                const int32_t* __restrict__ argmax, int64_t total, int batch, int channels,
                                int64_t plane, int64_t bins, at::opmath_type<scalar_t>* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = global_thread_index(); index < total; index += global_thread_count()) {
    const int64_t a = argmax[index];
    if (a < 0 || a >= plane) continue;
    const int64_t k = index / bins / channels;
    const int c = int((index / bins) % channels);
    const int batch_index = roi::roi_batch_index(acc_t(rois[k * 5]), batch);
    if (batch_index < 0) continue;
    atomicAdd(grad_input + (int64_t(batch_index) * channels + c) * plane + a, acc_t(grad[index]));
  }
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                                          double spatial_scale, int64_t pooled_h, int64_t pooled_w) {
  roi::check_rois(input, rois, "roi_pool");
  roi::check_pooled_size(pooled_h, pooled_w, "roi_pool");
  roi::check_spatial_scale(spatial_scale, "roi_pool");
  roi::check_feature_size(input.size(0), input.size(1), input.size(2), input.size(3), "roi_pool");
  roi::check_pool_plane(input.size(2), input.size(3), "roi_pool");
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t K = rois.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor output = at::empty({K, C, pooled_h, pooled_w}, input.options());
  at::Tensor argmax = at::empty({K, C, pooled_h, pooled_w}, input.options().dtype(at::kInt));
  if (output.numel() == 0) return {output, argmax};
  const at::Tensor in = input.contiguous();
  const at::Tensor boxes = rois.contiguous();
  const int64_t total = output.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t><<<roi_cuda::capped_blocks(total), roi_cuda::kThreads, 0, stream>>>(
        in.data_ptr<scalar_t>(), boxes.data_ptr<scalar_t>(), total, int(input.size(0)), int(C), int(H), int(W),
        int(pooled_h), int(pooled_w), acc_t(spatial_scale), output.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {output, argmax};
}

at::Tensor roi_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                  double /*spatial_scale*/, int64_t pooled_h, int64_t pooled_w, int64_t batch_size,
                                  int64_t channels, int64_t height, int64_t width) {
  roi::check_roi_grad(grad, rois, pooled_h, pooled_w, channels, "_roi_pool_backward");
  roi::check_roi_pool_argmax(argmax, grad);
  roi::check_feature_size(batch_size, channels, height, width, "_roi_pool_backward");
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width},
                                    grad.options().dtype(at::toOpMathType(grad.scalar_type())));
  if (grad.numel() == 0 || grad_input.numel() == 0) return grad_input.to(grad.scalar_type());
  at::globalContext().alertNotDeterministic("normkit::_roi_pool_backward (CUDA)");
  const at::Tensor g = grad.contiguous(), arg = argmax.contiguous(), boxes = rois.contiguous();
  const int64_t total = g.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t><<<roi_cuda::capped_blocks(total), roi_cuda::kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), boxes.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(), total, int(batch_size),
        int(channels), height * width, pooled_h * pooled_w, grad_input.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input.to(grad.scalar_type());
}

}  // namespace
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CUDA, m) {
  m.impl("roi_pool", &normkit::roi_pool_forward_cuda);
  m.impl("_roi_pool_backward", &normkit::roi_pool_backward_cuda);
}
