// RoIPool forward and backward on CPU. Geometry: csrc/common/roi_geometry.h.
// The input is read as NCHW (a channels_last input is made contiguous first); outputs are NCHW.
// Forward runs in parallel over RoIs, backward over channels (no two threads add into one cell).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/roi_checks.h"
#include "common/roi_geometry.h"

namespace normkit {
namespace {

template <typename scalar_t>
void forward_kernel(const scalar_t* input, const scalar_t* rois, int64_t num_rois, int64_t channels, int64_t height,
                    int64_t width, int64_t pooled_h, int64_t pooled_w, double spatial_scale, scalar_t* output,
                    int32_t* argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bins = pooled_h * pooled_w, plane = height * width;
  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    // Bin bounds of one RoI, [begin, end) per row and per column: computed once, used for every channel.
    std::vector<int> rows(2 * pooled_h), cols(2 * pooled_w);
    for (int64_t k = begin; k < end; ++k) {
      const scalar_t* roi = rois + k * 5;
      const int64_t n = int64_t(roi[0]);
      const acc_t box[4] = {acc_t(roi[1]), acc_t(roi[2]), acc_t(roi[3]), acc_t(roi[4])};
      const auto r = roi::pool_region<acc_t>(box, acc_t(spatial_scale), int(pooled_h), int(pooled_w));
      for (int ph = 0; ph < pooled_h; ++ph) roi::pool_bin_range(r.start_h, r.bin_h, ph, int(height), rows[2 * ph],
                                                                 rows[2 * ph + 1]);
      for (int pw = 0; pw < pooled_w; ++pw) roi::pool_bin_range(r.start_w, r.bin_w, pw, int(width), cols[2 * pw],
                                                                 cols[2 * pw + 1]);
      // Channel by channel: the bins of one RoI overlap, so its region of the plane stays in cache across them.
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* src = input + (n * channels + c) * plane;
        scalar_t* out = output + (k * channels + c) * bins;
        int32_t* arg = argmax + (k * channels + c) * bins;
        for (int ph = 0; ph < pooled_h; ++ph) {
          const int h0 = rows[2 * ph], h1 = rows[2 * ph + 1];
          for (int pw = 0; pw < pooled_w; ++pw) {
            const int w0 = cols[2 * pw], w1 = cols[2 * pw + 1];
            const int64_t b = ph * pooled_w + pw;
            if (!r.valid || h1 <= h0 || w1 <= w0) {
              out[b] = scalar_t(0);
              arg[b] = -1;
              continue;
            }
            acc_t best_val;
            arg[b] = int32_t(roi::bin_argmax(src, int(width), h0, h1, w0, w1, best_val));  // < plane
            out[b] = scalar_t(best_val);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                                         double spatial_scale, int64_t pooled_h, int64_t pooled_w) {
  roi::check_rois(input, rois, "roi_pool");
  roi::check_pooled_size(pooled_h, pooled_w, "roi_pool");
  roi::check_spatial_scale(spatial_scale, "roi_pool");
  roi::check_feature_size(input.size(0), input.size(1), input.size(2), input.size(3), "roi_pool");
  roi::check_pool_plane(input.size(2), input.size(3), "roi_pool");
  const int64_t K = rois.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor output = at::empty({K, C, pooled_h, pooled_w}, input.options());
  at::Tensor argmax = at::empty({K, C, pooled_h, pooled_w}, input.options().dtype(at::kInt));
  if (output.numel() == 0) return {output, argmax};
  roi::check_batch_indices(rois, input.size(0), "roi_pool");
  const at::Tensor in = input.contiguous();
  const at::Tensor boxes = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cpu", [&] {
    forward_kernel<scalar_t>(in.data_ptr<scalar_t>(), boxes.data_ptr<scalar_t>(), K, C, H, W, pooled_h, pooled_w,
                             spatial_scale, output.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>());
  });
  return {output, argmax};
}

at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                 double /*spatial_scale*/, int64_t pooled_h, int64_t pooled_w, int64_t batch_size,
                                 int64_t channels, int64_t height, int64_t width) {
  roi::check_roi_grad(grad, rois, pooled_h, pooled_w, channels, "_roi_pool_backward");
  roi::check_roi_pool_argmax(argmax, grad);
  roi::check_feature_size(batch_size, channels, height, width, "_roi_pool_backward");
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width},
                                    grad.options().dtype(at::toOpMathType(grad.scalar_type())));
  if (grad.numel() > 0 && grad_input.numel() > 0) {
    roi::check_batch_indices(rois, batch_size, "_roi_pool_backward");
    // grad is read through its strides: the gradient of a sum or a mean arrives expanded (stride 0), and a copy
    // would cost as much as the scatter itself.
    const at::Tensor arg = argmax.contiguous(), boxes = rois.contiguous();
    const int64_t K = rois.size(0), bins = pooled_h * pooled_w, plane = height * width;
    const int64_t gs_k = grad.stride(0), gs_c = grad.stride(1), gs_h = grad.stride(2), gs_w = grad.stride(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
      const scalar_t* roi_ptr = boxes.const_data_ptr<scalar_t>();
      const int32_t* arg_ptr = arg.const_data_ptr<int32_t>();
      acc_t* out = grad_input.data_ptr<acc_t>();
      at::parallel_for(0, channels, 1, [&](int64_t c_begin, int64_t c_end) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t n = int64_t(roi_ptr[k * 5]);
          for (int64_t c = c_begin; c < c_end; ++c) {
            const int32_t* a = arg_ptr + (k * channels + c) * bins;
            const scalar_t* g = g_ptr + k * gs_k + c * gs_c;
            acc_t* dst = out + (n * channels + c) * plane;
            for (int64_t ph = 0; ph < pooled_h; ++ph) {
              for (int64_t pw = 0; pw < pooled_w; ++pw) {
                const int64_t cell = a[ph * pooled_w + pw];
                if (cell >= 0 && cell < plane) dst[cell] += acc_t(g[ph * gs_h + pw * gs_w]);
              }
            }
          }
        }
      });
    });
  }
  return grad_input.to(grad.scalar_type());
}

}  // namespace
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("roi_pool", &normkit::roi_pool_forward_cpu);
  m.impl("_roi_pool_backward", &normkit::roi_pool_backward_cpu);
}
