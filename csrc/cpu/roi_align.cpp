// RoIAlign forward and backward on CPU (DESIGN.md §4). Geometry: csrc/common/roi_geometry.h.
//
// The bilinear neighbours and weights of every sample depend only on the RoI, so they are computed once per
// RoI and reused for all channels. Forward runs in parallel over RoIs (each writes its own output rows);
// backward runs in parallel over channels, so threads never add into the same gradient cell and the result
// does not depend on the thread count. NCHW and channels_last inputs are read in place.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/roi_checks.h"
#include "common/roi_geometry.h"

namespace normkit {
namespace {

using roi::AlignRegion;
using roi::BilinearSample;

// A bilinear sample with its weights already divided by the bin's sample count; indices are spatial (y * W + x).
template <typename T>
struct WeightedSample {
  int64_t i_ll, i_lh, i_hl, i_hh;
  T w_ll, w_lh, w_hl, w_hh;
};

// The valid samples of every bin of one RoI: bin b owns samples[bin_begin[b] .. bin_begin[b + 1]).
template <typename T>
struct RoISamples {
  std::vector<WeightedSample<T>> samples;
  std::vector<int64_t> bin_begin;

  void collect(const AlignRegion<T>& r, int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w) {
    samples.clear();
    bin_begin.assign(1, 0);
    const T inv_count = T(1) / r.count;
    for (int ph = 0; ph < pooled_h; ++ph) {
      for (int pw = 0; pw < pooled_w; ++pw) {
        for (int iy = 0; iy < r.grid_h; ++iy) {
          const T y = roi::align_sample_coordinate(r.start_h, r.bin_h, ph, iy, r.grid_h);
          for (int ix = 0; ix < r.grid_w; ++ix) {
            const T x = roi::align_sample_coordinate(r.start_w, r.bin_w, pw, ix, r.grid_w);
            BilinearSample<T> s;
            if (!roi::bilinear_sample(y, x, int(height), int(width), s)) continue;
            samples.push_back({s.y_low * width + s.x_low, s.y_low * width + s.x_high, s.y_high * width + s.x_low,
                               s.y_high * width + s.x_high, s.w_ll * inv_count, s.w_lh * inv_count,
                               s.w_hl * inv_count, s.w_hh * inv_count});
          }
        }
        bin_begin.push_back(int64_t(samples.size()));
      }
    }
  }
};

struct AlignShape {
  int64_t num_rois, channels, height, width, pooled_h, pooled_w;
  int64_t bins() const { return pooled_h * pooled_w; }
  int64_t plane() const { return height * width; }
};

template <typename scalar_t, typename acc_t>
AlignRegion<acc_t> region_of(const scalar_t* roi, double spatial_scale, const AlignShape& s, int64_t sampling_ratio,
                             bool aligned) {
  const acc_t box[4] = {acc_t(roi[1]), acc_t(roi[2]), acc_t(roi[3]), acc_t(roi[4])};
  return roi::align_region<acc_t>(box, acc_t(spatial_scale), int(s.pooled_h), int(s.pooled_w), int(sampling_ratio),
                                  aligned);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* input, const scalar_t* rois, const AlignShape& s, double spatial_scale,
                    int64_t sampling_ratio, bool aligned, bool channels_last, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.channels, bins = s.bins(), plane = s.plane();
  at::parallel_for(0, s.num_rois, 1, [&](int64_t begin, int64_t end) {
    RoISamples<acc_t> rs;
    std::vector<acc_t> acc(channels_last ? C : 0);
    for (int64_t k = begin; k < end; ++k) {
      const scalar_t* roi = rois + k * 5;
      const int64_t n = int64_t(roi[0]);
      rs.collect(region_of<scalar_t, acc_t>(roi, spatial_scale, s, sampling_ratio, aligned), s.height, s.width,
                 s.pooled_h, s.pooled_w);
      if (!channels_last) {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* src = input + (n * C + c) * plane;
          scalar_t* dst = output + (k * C + c) * bins;
          for (int64_t b = 0; b < bins; ++b) {
            acc_t sum = 0;
            for (int64_t i = rs.bin_begin[b]; i < rs.bin_begin[b + 1]; ++i) {
              const auto& w = rs.samples[i];
              sum += w.w_ll * acc_t(src[w.i_ll]) + w.w_lh * acc_t(src[w.i_lh]) + w.w_hl * acc_t(src[w.i_hl]) +
                     w.w_hh * acc_t(src[w.i_hh]);
            }
            dst[b] = scalar_t(sum);
          }
        }
      } else {  // input (N, H, W, C) and output (K, PH, PW, C) in memory: the channel loop is contiguous
        const scalar_t* src = input + n * plane * C;
        scalar_t* dst = output + k * bins * C;
        for (int64_t b = 0; b < bins; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t i = rs.bin_begin[b]; i < rs.bin_begin[b + 1]; ++i) {
            const auto& w = rs.samples[i];
            const scalar_t *p_ll = src + w.i_ll * C, *p_lh = src + w.i_lh * C, *p_hl = src + w.i_hl * C,
                           *p_hh = src + w.i_hh * C;
            for (int64_t c = 0; c < C; ++c) {
              acc[c] += w.w_ll * acc_t(p_ll[c]) + w.w_lh * acc_t(p_lh[c]) + w.w_hl * acc_t(p_hl[c]) +
                        w.w_hh * acc_t(p_hh[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) dst[b * C + c] = scalar_t(acc[c]);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad, const scalar_t* rois, const AlignShape& s, double spatial_scale,
                     int64_t sampling_ratio, bool aligned, bool channels_last, acc_t* grad_input) {
  const int64_t C = s.channels, bins = s.bins(), plane = s.plane();
  // Each thread owns a channel range of grad_input; the per-RoI geometry is recomputed per thread (cheap).
  at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
    RoISamples<acc_t> rs;
    for (int64_t k = 0; k < s.num_rois; ++k) {
      const scalar_t* roi = rois + k * 5;
      const int64_t n = int64_t(roi[0]);
      rs.collect(region_of<scalar_t, acc_t>(roi, spatial_scale, s, sampling_ratio, aligned), s.height, s.width,
                 s.pooled_h, s.pooled_w);
      if (rs.samples.empty()) continue;
      if (!channels_last) {
        for (int64_t c = c_begin; c < c_end; ++c) {
          const scalar_t* g = grad + (k * C + c) * bins;
          acc_t* dst = grad_input + (n * C + c) * plane;
          for (int64_t b = 0; b < bins; ++b) {
            const acc_t gv = acc_t(g[b]);
            for (int64_t i = rs.bin_begin[b]; i < rs.bin_begin[b + 1]; ++i) {
              const auto& w = rs.samples[i];
              dst[w.i_ll] += w.w_ll * gv;
              dst[w.i_lh] += w.w_lh * gv;
              dst[w.i_hl] += w.w_hl * gv;
              dst[w.i_hh] += w.w_hh * gv;
            }
          }
        }
      } else {
        const scalar_t* g_roi = grad + k * bins * C;
        acc_t* dst = grad_input + n * plane * C;
        for (int64_t b = 0; b < bins; ++b) {
          const scalar_t* g = g_roi + b * C;
          for (int64_t i = rs.bin_begin[b]; i < rs.bin_begin[b + 1]; ++i) {
            const auto& w = rs.samples[i];
            acc_t *d_ll = dst + w.i_ll * C, *d_lh = dst + w.i_lh * C, *d_hl = dst + w.i_hl * C,
                  *d_hh = dst + w.i_hh * C;
            for (int64_t c = c_begin; c < c_end; ++c) {
              const acc_t gv = acc_t(g[c]);
              d_ll[c] += w.w_ll * gv;
              d_lh[c] += w.w_lh * gv;
              d_hl[c] += w.w_hl * gv;
              d_hh[c] += w.w_hh * gv;
            }
          }
        }
      }
    }
  });
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                 bool /*deterministic: selects the backward kernel*/) {
  roi::check_rois(input, rois, "roi_align");
  roi::check_pooled_size(pooled_h, pooled_w, "roi_align");
  const AlignShape s{rois.size(0), input.size(1), input.size(2), input.size(3), pooled_h, pooled_w};
  const bool channels_last = roi::is_channels_last(input);
  at::Tensor output = at::empty({s.num_rois, s.channels, pooled_h, pooled_w},
                                input.options().memory_format(roi::kernel_memory_format(input)));
  if (output.numel() == 0) return output;
  roi::check_batch_indices(rois, input.size(0), "roi_align");
  const at::Tensor in = input.contiguous(roi::kernel_memory_format(input));
  const at::Tensor boxes = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cpu", [&] {
    forward_kernel<scalar_t>(in.data_ptr<scalar_t>(), boxes.data_ptr<scalar_t>(), s, spatial_scale, sampling_ratio,
                             aligned, channels_last, output.data_ptr<scalar_t>());
  });
  return output;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_h, int64_t pooled_w, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                  bool /*deterministic: the CPU backward always is*/) {
  roi::check_roi_grad(grad, rois, pooled_h, pooled_w, channels, "_roi_align_backward");
  const AlignShape s{rois.size(0), channels, height, width, pooled_h, pooled_w};
  const bool channels_last = roi::is_channels_last(grad);
  // Accumulate in fp32 for half/bfloat16: many RoIs may add into one cell.
  at::Tensor grad_input = at::empty({batch_size, channels, height, width},
                                    grad.options()
                                        .dtype(at::toOpMathType(grad.scalar_type()))
                                        .memory_format(roi::kernel_memory_format(grad)))
                               .zero_();  // (at::zeros ignores the memory format)
  if (grad.numel() > 0 && grad_input.numel() > 0) {
    roi::check_batch_indices(rois, batch_size, "_roi_align_backward");
    const at::Tensor g = grad.contiguous(roi::kernel_memory_format(grad));
    const at::Tensor boxes = rois.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(g.data_ptr<scalar_t>(), boxes.data_ptr<scalar_t>(), s, spatial_scale,
                                       sampling_ratio, aligned, channels_last, grad_input.data_ptr<acc_t>());
    });
  }
  return grad_input.to(grad.scalar_type());
}

}  // namespace
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("roi_align", &normkit::roi_align_forward_cpu);
  m.impl("_roi_align_backward", &normkit::roi_align_backward_cpu);
}
