// RoIAlign forward and backward on CPU. Geometry: csrc/common/roi_geometry.h.
//
// Bilinear interpolation is separable and a RoI's sample x coordinates are the same for every bin row (and its
// y coordinates for every bin column), so each RoI gets two small per-axis tables of valid samples (neighbour
// offsets and weights), built once per RoI and reused for every bin and channel. Memory is O(pooled * grid) per
// axis, independent of the box size and of grid_h * grid_w; samples outside the map never enter the tables, so
// a huge box costs only its samples that land on the map. Forward runs in parallel over RoIs (each writes its own
// output rows); backward runs in parallel over channels, so threads never add into the same gradient cell and
// the result does not depend on the thread count. NCHW and channels_last inputs are read in place.
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

// One valid sample along one axis: memory offsets of its two neighbours (cell index times the axis stride)
// and their linear-interpolation weights.
template <typename T>
struct AxisSample {
  int64_t low, high;
  T w_low, w_high;
};

// The valid samples of every bin along one axis: bin p owns samples[bin_begin[p] .. bin_begin[p + 1]).
template <typename T>
struct AxisSamples {
  std::vector<AxisSample<T>> samples;
  std::vector<int64_t> bin_begin;

  void collect(T start, T bin, int64_t pooled, int grid, int64_t size, int64_t stride) {
    samples.clear();
    bin_begin.assign(1, 0);
    for (int p = 0; p < pooled; ++p) {
      int first, last;
      roi::align_sample_range(start, bin, p, grid, int(size), &first, &last);
      for (int i = first; i < last; ++i) {
        int low, high;
        T w_low, w_high;
        if (roi::linear_sample(roi::align_sample_coordinate(start, bin, p, i, grid), int(size), low, high, w_low,
                               w_high)) {
          samples.push_back({low * stride, high * stride, w_low, w_high});
        }
      }
      bin_begin.push_back(int64_t(samples.size()));
    }
  }
  const AxisSample<T>* begin(int64_t p) const { return samples.data() + bin_begin[p]; }
  const AxisSample<T>* end(int64_t p) const { return samples.data() + bin_begin[p + 1]; }
};

struct AlignShape {
  int64_t num_rois, channels, height, width, pooled_h, pooled_w;
  int64_t bins() const { return pooled_h * pooled_w; }
  int64_t plane() const { return height * width; }
};

// The sample tables of one RoI; `y_stride`/`x_stride` turn cells into memory offsets (W and 1 for NCHW planes,
// W * C and C for channels_last images). Returns the bin average's divisor.
template <typename scalar_t, typename acc_t>
acc_t collect_samples(const scalar_t* roi, double spatial_scale, const AlignShape& s, int64_t sampling_ratio,
                      bool aligned, int64_t y_stride, int64_t x_stride, AxisSamples<acc_t>& ys,
                      AxisSamples<acc_t>& xs) {
  const acc_t box[4] = {acc_t(roi[1]), acc_t(roi[2]), acc_t(roi[3]), acc_t(roi[4])};
  const AlignRegion<acc_t> r = roi::align_region<acc_t>(box, acc_t(spatial_scale), int(s.pooled_h),
                                                        int(s.pooled_w), int(sampling_ratio), aligned);
  ys.collect(r.start_h, r.bin_h, s.pooled_h, r.grid_h, s.height, y_stride);
  xs.collect(r.start_w, r.bin_w, s.pooled_w, r.grid_w, s.width, x_stride);
  return r.count;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* input, const scalar_t* rois, const AlignShape& s, double spatial_scale,
                    int64_t sampling_ratio, bool aligned, bool channels_last, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.channels, bins = s.bins(), plane = s.plane();
  at::parallel_for(0, s.num_rois, 1, [&](int64_t begin, int64_t end) {
    AxisSamples<acc_t> ys, xs;
    std::vector<acc_t> acc(channels_last ? C : 0);
    for (int64_t k = begin; k < end; ++k) {
      const scalar_t* roi = rois + k * 5;
      const int64_t n = int64_t(roi[0]);
      if (!channels_last) {
        const acc_t count =
            collect_samples<scalar_t, acc_t>(roi, spatial_scale, s, sampling_ratio, aligned, s.width, 1, ys, xs);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* src = input + (n * C + c) * plane;
          scalar_t* dst = output + (k * C + c) * bins;
          for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
            for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
              acc_t sum = 0;
              for (const auto* y = ys.begin(ph); y != ys.end(ph); ++y) {
                const scalar_t *row_low = src + y->low, *row_high = src + y->high;
                for (const auto* x = xs.begin(pw); x != xs.end(pw); ++x) {
                  const acc_t low = x->w_low * acc_t(row_low[x->low]) + x->w_high * acc_t(row_low[x->high]);
                  const acc_t high = x->w_low * acc_t(row_high[x->low]) + x->w_high * acc_t(row_high[x->high]);
                  sum += y->w_low * low + y->w_high * high;
                }
              }
              dst[ph * s.pooled_w + pw] = scalar_t(sum / count);
            }
          }
        }
      } else {  // input (N, H, W, C) and output (K, PH, PW, C) in memory: the channel loop is contiguous
        const acc_t count = collect_samples<scalar_t, acc_t>(roi, spatial_scale, s, sampling_ratio, aligned,
                                                             s.width * C, C, ys, xs);
        const scalar_t* src = input + n * plane * C;
        scalar_t* dst = output + k * bins * C;
        for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
          for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (const auto* y = ys.begin(ph); y != ys.end(ph); ++y) {
              for (const auto* x = xs.begin(pw); x != xs.end(pw); ++x) {
                const scalar_t *p_ll = src + y->low + x->low, *p_lh = src + y->low + x->high,
                               *p_hl = src + y->high + x->low, *p_hh = src + y->high + x->high;
                const acc_t w_ll = y->w_low * x->w_low, w_lh = y->w_low * x->w_high, w_hl = y->w_high * x->w_low,
                            w_hh = y->w_high * x->w_high;
                for (int64_t c = 0; c < C; ++c) {
                  acc[c] += w_ll * acc_t(p_ll[c]) + w_lh * acc_t(p_lh[c]) + w_hl * acc_t(p_hl[c]) +
                            w_hh * acc_t(p_hh[c]);
                }
              }
            }
            scalar_t* out = dst + (ph * s.pooled_w + pw) * C;
            for (int64_t c = 0; c < C; ++c) out[c] = scalar_t(acc[c] / count);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad, const scalar_t* rois, const AlignShape& s, double spatial_scale,
                     int64_t sampling_ratio, bool aligned, bool channels_last, acc_t* grad_input) {
  const int64_t C = s.channels, bins = s.bins(), plane = s.plane();
  // Each thread owns a channel range of grad_input; the per-RoI tables are rebuilt per thread (cheap).
  at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
    AxisSamples<acc_t> ys, xs;
    for (int64_t k = 0; k < s.num_rois; ++k) {
      const scalar_t* roi = rois + k * 5;
      const int64_t n = int64_t(roi[0]);
      if (!channels_last) {
        const acc_t count =
            collect_samples<scalar_t, acc_t>(roi, spatial_scale, s, sampling_ratio, aligned, s.width, 1, ys, xs);
        if (ys.samples.empty() || xs.samples.empty()) continue;
        for (int64_t c = c_begin; c < c_end; ++c) {
          const scalar_t* g = grad + (k * C + c) * bins;
          acc_t* dst = grad_input + (n * C + c) * plane;
          for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
            for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
              const acc_t gv = acc_t(g[ph * s.pooled_w + pw]) / count;
              for (const auto* y = ys.begin(ph); y != ys.end(ph); ++y) {
                const acc_t g_low = y->w_low * gv, g_high = y->w_high * gv;
                acc_t *row_low = dst + y->low, *row_high = dst + y->high;
                for (const auto* x = xs.begin(pw); x != xs.end(pw); ++x) {
                  row_low[x->low] += g_low * x->w_low;
                  row_low[x->high] += g_low * x->w_high;
                  row_high[x->low] += g_high * x->w_low;
                  row_high[x->high] += g_high * x->w_high;
                }
              }
            }
          }
        }
      } else {
        const acc_t count = collect_samples<scalar_t, acc_t>(roi, spatial_scale, s, sampling_ratio, aligned,
                                                             s.width * C, C, ys, xs);
        if (ys.samples.empty() || xs.samples.empty()) continue;
        const scalar_t* g_roi = grad + k * bins * C;
        acc_t* dst = grad_input + n * plane * C;
        for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
          for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
            const scalar_t* g = g_roi + (ph * s.pooled_w + pw) * C;
            for (const auto* y = ys.begin(ph); y != ys.end(ph); ++y) {
              for (const auto* x = xs.begin(pw); x != xs.end(pw); ++x) {
                acc_t *d_ll = dst + y->low + x->low, *d_lh = dst + y->low + x->high,
                      *d_hl = dst + y->high + x->low, *d_hh = dst + y->high + x->high;
                const acc_t w_ll = y->w_low * x->w_low / count, w_lh = y->w_low * x->w_high / count,
                            w_hl = y->w_high * x->w_low / count, w_hh = y->w_high * x->w_high / count;
                for (int64_t c = c_begin; c < c_end; ++c) {
                  const acc_t gv = acc_t(g[c]);
                  d_ll[c] += w_ll * gv;
                  d_lh[c] += w_lh * gv;
                  d_hl[c] += w_hl * gv;
                  d_hh[c] += w_hh * gv;
                }
              }
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
  roi::check_align_arguments(spatial_scale, pooled_h, pooled_w, sampling_ratio, "roi_align");
  roi::check_feature_size(input.size(0), input.size(1), input.size(2), input.size(3), "roi_align");
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
  roi::check_align_arguments(spatial_scale, pooled_h, pooled_w, sampling_ratio, "_roi_align_backward");
  roi::check_feature_size(batch_size, channels, height, width, "_roi_align_backward");
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
