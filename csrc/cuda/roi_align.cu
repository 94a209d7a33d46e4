// RoIAlign forward and backward on CUDA. Geometry: csrc/common/roi_geometry.h (shared with CPU).
//
// Forward: one thread per output element, ordered like the output's memory (for channels_last the channel is
// fastest, so neighbouring threads read neighbouring input channels).
// Backward, two kernels:
//  - default: each grad element scatters into its samples' four neighbours with atomicAdd (fast, but the
//    float summation order varies between runs);
//  - deterministic: the (cell, weight, source bin) contributions of all samples are listed (they do not depend
//    on the channel), sorted stably by cell, and each (cell, channel) sums its contributions in that fixed
//    order. No atomics, so results are bitwise reproducible.
// Both accumulate in fp32 for half/bfloat16 (and fp64 for double).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "common/roi_checks.h"
#include "common/roi_geometry.h"
#include "cuda/roi_launch.cuh"

namespace normkit {
namespace {

using roi::AlignRegion;
using roi::BilinearSample;
using roi_cuda::global_thread_count;
using roi_cuda::global_thread_index;

struct AlignShape {
  int batch, channels, height, width, pooled_h, pooled_w;
};

// Splits a linear output/grad index into (roi, channel, bin) for the given memory layout.
template <bool kChannelsLast>
__device__ inline void split_index(int64_t index, const AlignShape& s, int64_t& k, int& c, int& bin) {
  const int bins = s.pooled_h * s.pooled_w;
  if (kChannelsLast) {  // (K, PH, PW, C)
    c = int(index % s.channels);
    const int64_t t = index / s.channels;
    bin = int(t % bins);
    k = t / bins;
  } else {  // (K, C, PH, PW)
    bin = int(index % bins);
    const int64_t t = index / bins;
    c = int(t % s.channels);
    k = t / s.channels;
  }
}

// Reads box k; false (output 0) for a batch index the CPU kernels would reject (cannot throw here).
template <typename scalar_t, typename acc_t>
__device__ inline bool load_region(const scalar_t* rois, int64_t k, const AlignShape& s, acc_t spatial_scale,
                                   int sampling_ratio, bool aligned, int& n, AlignRegion<acc_t>& r) {
  const scalar_t* roi = rois + k * 5;
  n = roi::roi_batch_index(acc_t(roi[0]), s.batch);
  if (n < 0) return false;
  const acc_t box[4] = {acc_t(roi[1]), acc_t(roi[2]), acc_t(roi[3]), acc_t(roi[4])};
  r = roi::align_region<acc_t>(box, spatial_scale, s.pooled_h, s.pooled_w, sampling_ratio, aligned);
  return true;
}

// Offset of (n, c) and the step between spatial positions, for NCHW or NHWC memory.
template <bool kChannelsLast>
__device__ inline int64_t plane_offset(int n, int c, const AlignShape& s, int64_t& spatial_stride) {
  const int64_t plane = int64_t(s.height) * s.width;
  spatial_stride = kChannelsLast ? s.channels : 1;
  return kChannelsLast ? int64_t(n) * plane * s.channels + c : (int64_t(n) * s.channels + c) * plane;
}

template <typename scalar_t, bool kChannelsLast>
__global__ void forward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ rois, int64_t total,
                               AlignShape s, at::opmath_type<scalar_t> spatial_scale, int sampling_ratio,
                               bool aligned, scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = global_thread_index(); index < total; index += global_thread_count()) {
    int64_t k;
    int c, bin, n;
    split_index<kChannelsLast>(index, s, k, c, bin);
    AlignRegion<acc_t> r;
    if (!load_region(rois, k, s, spatial_scale, sampling_ratio, aligned, n, r)) {
      output[index] = scalar_t(0);
      continue;
    }
    const int ph = bin / s.pooled_w, pw = bin % s.pooled_w;
    int64_t stride;
    const scalar_t* src = input + plane_offset<kChannelsLast>(n, c, s, stride);
    acc_t sum = 0;
    int y_first, y_last, x_first, x_last;
    roi::align_sample_range(r.start_h, r.bin_h, ph, r.grid_h, s.height, &y_first, &y_last);
    roi::align_sample_range(r.start_w, r.bin_w, pw, r.grid_w, s.width, &x_first, &x_last);
    for (int iy = y_first; iy < y_last; ++iy) {
      const acc_t y = roi::align_sample_coordinate(r.start_h, r.bin_h, ph, iy, r.grid_h);
      for (int ix = x_first; ix < x_last; ++ix) {
        const acc_t x = roi::align_sample_coordinate(r.start_w, r.bin_w, pw, ix, r.grid_w);
        BilinearSample<acc_t> b;
        if (!roi::bilinear_sample(y, x, s.height, s.width, b)) continue;
        sum += b.w_ll * acc_t(src[(int64_t(b.y_low) * s.width + b.x_low) * stride]) +
               b.w_lh * acc_t(src[(int64_t(b.y_low) * s.width + b.x_high) * stride]) +
               b.w_hl * acc_t(src[(int64_t(b.y_high) * s.width + b.x_low) * stride]) +
               b.w_hh * acc_t(src[(int64_t(b.y_high) * s.width + b.x_high) * stride]);
      }
    }
    output[index] = scalar_t(sum / r.count);
  }
}

template <typename scalar_t, bool kChannelsLast>
__global__ void backward_atomic_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rois,
                                       int64_t total, AlignShape s, at::opmath_type<scalar_t> spatial_scale,
                                       int sampling_ratio, bool aligned,
                                       at::opmath_type<scalar_t>* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = global_thread_index(); index < total; index += global_thread_count()) {
    int64_t k;
    int c, bin, n;
    split_index<kChannelsLast>(index, s, k, c, bin);
    AlignRegion<acc_t> r;
    if (!load_region(rois, k, s, spatial_scale, sampling_ratio, aligned, n, r)) continue;
    const int ph = bin / s.pooled_w, pw = bin % s.pooled_w;
    int64_t stride;
    acc_t* dst = grad_input + plane_offset<kChannelsLast>(n, c, s, stride);
    const acc_t g = acc_t(grad[index]) / r.count;
    int y_first, y_last, x_first, x_last;
    roi::align_sample_range(r.start_h, r.bin_h, ph, r.grid_h, s.height, &y_first, &y_last);
    roi::align_sample_range(r.start_w, r.bin_w, pw, r.grid_w, s.width, &x_first, &x_last);
    for (int iy = y_first; iy < y_last; ++iy) {
      const acc_t y = roi::align_sample_coordinate(r.start_h, r.bin_h, ph, iy, r.grid_h);
      for (int ix = x_first; ix < x_last; ++ix) {
        const acc_t x = roi::align_sample_coordinate(r.start_w, r.bin_w, pw, ix, r.grid_w);
        BilinearSample<acc_t> b;
        if (!roi::bilinear_sample(y, x, s.height, s.width, b)) continue;
        atomicAdd(dst + (int64_t(b.y_low) * s.width + b.x_low) * stride, b.w_ll * g);
        atomicAdd(dst + (int64_t(b.y_low) * s.width + b.x_high) * stride, b.w_lh * g);
        atomicAdd(dst + (int64_t(b.y_high) * s.width + b.x_low) * stride, b.w_hl * g);
        atomicAdd(dst + (int64_t(b.y_high) * s.width + b.x_high) * stride, b.w_hh * g);
      }
    }
  }
}

// Samples that may land on the map in the first `bins` bins along one axis (roi::align_sample_range).
template <typename acc_t>
__device__ inline int64_t axis_samples_before(acc_t start, acc_t bin, int bins, int grid, int size) {
  int64_t total = 0;
  for (int p = 0; p < bins; ++p) {
    int first, last;
    roi::align_sample_range(start, bin, p, grid, size, &first, &last);
    total += last - first;
  }
  return total;
}

// Deterministic backward, step 1: per RoI, the samples that may land on the map along y summed over the bin rows
// and along x summed over the bin columns (0 for an invalid batch index); RoI k lists 4 * ys * xs contributions,
// so a box far larger than the map costs its samples on the map only. Stored so that the offsets and the
// listing kernel agree.
template <typename scalar_t>
__global__ void sample_counts_kernel(const scalar_t* __restrict__ rois, int64_t num_rois, AlignShape s,
                                     at::opmath_type<scalar_t> spatial_scale, int sampling_ratio, bool aligned,
                                     int64_t* __restrict__ counts) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = global_thread_index(); k < num_rois; k += global_thread_count()) {
    AlignRegion<acc_t> r;
    int n = 0;
    int64_t ys = 0, xs = 0;
    if (load_region(rois, k, s, spatial_scale, sampling_ratio, aligned, n, r)) {
      ys = axis_samples_before(r.start_h, r.bin_h, s.pooled_h, r.grid_h, s.height);
      xs = axis_samples_before(r.start_w, r.bin_w, s.pooled_w, r.grid_w, s.width);
    }
    counts[2 * k] = ys;
    counts[2 * k + 1] = xs;
  }
}

// Deterministic backward, step 2, for the RoIs [first_roi, first_roi + num_rois) of one chunk: one thread per
// (roi, bin) lists the 4 contributions of each of its samples in range, bins in row-major order after the RoI's
// first contribution at 4 * (sample_offset[k] - sample_offset[first_roi]). cell = n * H * W + y * W + x, or
// `invalid_cell` (sorted last, ignored) for samples outside the map; source = k * bins + bin; weight includes
// 1 / count.
template <typename scalar_t>
__global__ void list_contributions_kernel(const scalar_t* __restrict__ rois, const int64_t* __restrict__ counts,
                                          const int64_t* __restrict__ sample_offset, int64_t first_roi,
                                          int64_t num_rois, AlignShape s, at::opmath_type<scalar_t> spatial_scale,
                                          int sampling_ratio, bool aligned, int64_t invalid_cell,
                                          int64_t* __restrict__ cells, at::opmath_type<scalar_t>* __restrict__ weights,
                                          int64_t* __restrict__ sources) {
  using acc_t = at::opmath_type<scalar_t>;
  const int bins = s.pooled_h * s.pooled_w;
  const int64_t plane = int64_t(s.height) * s.width;
  for (int64_t item = global_thread_index(); item < num_rois * bins; item += global_thread_count()) {
    const int64_t k = first_roi + item / bins;
    const int64_t roi_xs = counts[2 * k + 1];
    if (counts[2 * k] == 0 || roi_xs == 0) continue;
    const int bin = int(item % bins);
    const int ph = bin / s.pooled_w, pw = bin % s.pooled_w;
    AlignRegion<acc_t> r;
    int n = 0;
    load_region(rois, k, s, spatial_scale, sampling_ratio, aligned, n, r);
    // The bin's samples follow those of the bin rows above (ys_above * roi_xs) and of the bins to its left.
    const int64_t ys_above = axis_samples_before(r.start_h, r.bin_h, ph, r.grid_h, s.height);
    const int64_t xs_left = axis_samples_before(r.start_w, r.bin_w, pw, r.grid_w, s.width);
    int y_first, y_last, x_first, x_last;
    roi::align_sample_range(r.start_h, r.bin_h, ph, r.grid_h, s.height, &y_first, &y_last);
    roi::align_sample_range(r.start_w, r.bin_w, pw, r.grid_w, s.width, &x_first, &x_last);
    int64_t e = 4 * (sample_offset[k] - sample_offset[first_roi] + ys_above * roi_xs +
                     int64_t(y_last - y_first) * xs_left);
    for (int iy = y_first; iy < y_last; ++iy) {
      const acc_t y = roi::align_sample_coordinate(r.start_h, r.bin_h, ph, iy, r.grid_h);
      for (int ix = x_first; ix < x_last; ++ix, e += 4) {
        const acc_t x = roi::align_sample_coordinate(r.start_w, r.bin_w, pw, ix, r.grid_w);
        BilinearSample<acc_t> b;
        if (!roi::bilinear_sample(y, x, s.height, s.width, b)) {
          for (int j = 0; j < 4; ++j) {
            cells[e + j] = invalid_cell;
            weights[e + j] = acc_t(0);
            sources[e + j] = 0;
          }
          continue;
        }
        const int64_t base = int64_t(n) * plane;
        cells[e + 0] = base + int64_t(b.y_low) * s.width + b.x_low;
        cells[e + 1] = base + int64_t(b.y_low) * s.width + b.x_high;
        cells[e + 2] = base + int64_t(b.y_high) * s.width + b.x_low;
        cells[e + 3] = base + int64_t(b.y_high) * s.width + b.x_high;
        weights[e + 0] = b.w_ll / r.count;
        weights[e + 1] = b.w_lh / r.count;
        weights[e + 2] = b.w_hl / r.count;
        weights[e + 3] = b.w_hh / r.count;
        for (int j = 0; j < 4; ++j) sources[e + j] = k * bins + bin;
      }
    }
  }
}

// Deterministic backward, step 3: thread (segment, channel) sums the sorted contributions of one cell in order and
// adds the sum to the cell's gradient (earlier chunks' sums are already there).
template <typename scalar_t, bool kChannelsLast>
__global__ void gather_segments_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ cells,
                                       const at::opmath_type<scalar_t>* __restrict__ weights,
                                       const int64_t* __restrict__ sources,
                                       const int64_t* __restrict__ segment_begin, int64_t num_segments,
                                       int64_t num_entries, AlignShape s, int64_t invalid_cell,
                                       at::opmath_type<scalar_t>* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bins = int64_t(s.pooled_h) * s.pooled_w;
  const int64_t plane = int64_t(s.height) * s.width;
  for (int64_t item = global_thread_index(); item < num_segments * s.channels; item += global_thread_count()) {
    // Channel fastest for channels_last (coalesced), segment fastest for NCHW (cells increase along a plane).
    const int64_t seg = kChannelsLast ? item / s.channels : item % num_segments;
    const int c = int(kChannelsLast ? item % s.channels : item / num_segments);
    const int64_t begin = segment_begin[seg];
    const int64_t end = seg + 1 < num_segments ? segment_begin[seg + 1] : num_entries;
    const int64_t cell = cells[begin];
    if (cell == invalid_cell) continue;
    acc_t sum = 0;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t src = sources[e];
      const int64_t g = kChannelsLast ? src * s.channels + c : ((src / bins) * s.channels + c) * bins + src % bins;
      sum += weights[e] * acc_t(grad[g]);
    }
    const int64_t n = cell / plane, spatial = cell % plane;
    grad_input[kChannelsLast ? (n * plane + spatial) * s.channels + c : (n * s.channels + c) * plane + spatial] += sum;
  }
}

// The deterministic backward of the RoIs [first_roi, first_roi + num_rois), whose samples give num_entries > 0
// contributions: list them, sort them by cell and add each cell's ordered sum into grad_input.
void add_chunk_contributions(const at::Tensor& grad, const at::Tensor& boxes, const at::Tensor& counts,
                             const at::Tensor& sample_offset, int64_t first_roi, int64_t num_rois, int64_t num_entries,
                             const AlignShape& s, double spatial_scale, int64_t sampling_ratio, bool aligned,
                             int64_t invalid_cell, bool channels_last, at::Tensor& grad_input) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor cells = at::empty({num_entries}, grad.options().dtype(at::kLong));
  at::Tensor weights = at::empty({num_entries}, grad_input.options());
  at::Tensor sources = at::empty({num_entries}, grad.options().dtype(at::kLong));
  const int64_t bin_items = num_rois * s.pooled_h * s.pooled_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_list_contributions", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    list_contributions_kernel<scalar_t><<<roi_cuda::capped_blocks(bin_items), roi_cuda::kThreads, 0, stream>>>(
        boxes.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), sample_offset.data_ptr<int64_t>(), first_roi, num_rois,
        s, acc_t(spatial_scale), int(sampling_ratio), aligned, invalid_cell, cells.data_ptr<int64_t>(),
        weights.data_ptr<acc_t>(), sources.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // A stable sort keeps each cell's contributions in listing order, so the summation order is fixed.
  const auto sorted = cells.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_cells = std::get<0>(sorted);
  const at::Tensor order = std::get<1>(sorted);
  const at::Tensor sorted_weights = weights.index_select(0, order);
  const at::Tensor sorted_sources = sources.index_select(0, order);
  at::Tensor is_first = at::ones({num_entries}, grad.options().dtype(at::kBool));
  is_first.slice(0, 1).copy_(sorted_cells.slice(0, 1) != sorted_cells.slice(0, 0, num_entries - 1));
  const at::Tensor segment_begin = at::nonzero(is_first).flatten().contiguous();
  const int64_t num_segments = segment_begin.numel();
  const int64_t total = num_segments * s.channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_gather_segments", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = channels_last ? gather_segments_kernel<scalar_t, true> : gather_segments_kernel<scalar_t, false>;
    kernel<<<roi_cuda::capped_blocks(total), roi_cuda::kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), sorted_cells.data_ptr<int64_t>(), sorted_weights.data_ptr<acc_t>(),
        sorted_sources.data_ptr<int64_t>(), segment_begin.data_ptr<int64_t>(), num_segments, num_entries, s,
        invalid_cell, grad_input.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                  bool /*deterministic: selects the backward kernel*/) {
  roi::check_rois(input, rois, "roi_align");
  roi::check_align_arguments(spatial_scale, pooled_h, pooled_w, sampling_ratio, "roi_align");
  roi::check_feature_size(input.size(0), input.size(1), input.size(2), input.size(3), "roi_align");
  c10::cuda::CUDAGuard guard(input.device());
  const auto format = roi::kernel_memory_format(input);
  at::Tensor output =
      at::empty({rois.size(0), input.size(1), pooled_h, pooled_w}, input.options().memory_format(format));
  if (output.numel() == 0) return output;
  const AlignShape s{int(input.size(0)), int(input.size(1)), int(input.size(2)), int(input.size(3)), int(pooled_h),
                     int(pooled_w)};
  const at::Tensor in = input.contiguous(format);
  const at::Tensor boxes = rois.contiguous();
  const int64_t total = output.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel =
        format == at::MemoryFormat::ChannelsLast ? forward_kernel<scalar_t, true> : forward_kernel<scalar_t, false>;
    kernel<<<roi_cuda::capped_blocks(total), roi_cuda::kThreads, 0, stream>>>(
        in.data_ptr<scalar_t>(), boxes.data_ptr<scalar_t>(), total, s, acc_t(spatial_scale), int(sampling_ratio),
        aligned, output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_h, int64_t pooled_w, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                   bool deterministic) {
  roi::check_roi_grad(grad, rois, pooled_h, pooled_w, channels, "_roi_align_backward");
  roi::check_align_arguments(spatial_scale, pooled_h, pooled_w, sampling_ratio, "_roi_align_backward");
  roi::check_feature_size(batch_size, channels, height, width, "_roi_align_backward");
  c10::cuda::CUDAGuard guard(grad.device());
  const auto format = roi::kernel_memory_format(grad);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  at::Tensor grad_input = at::empty({batch_size, channels, height, width},
                                    grad.options().dtype(at::toOpMathType(grad.scalar_type())).memory_format(format))
                              .zero_();
  if (grad.numel() == 0 || grad_input.numel() == 0) return grad_input.to(grad.scalar_type());
  const AlignShape s{int(batch_size), int(channels), int(height), int(width), int(pooled_h), int(pooled_w)};
  const at::Tensor g = grad.contiguous(format);
  const at::Tensor boxes = rois.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (!deterministic) {
    at::globalContext().alertNotDeterministic("normkit::_roi_align_backward (CUDA, deterministic=False)");
    const int64_t total = g.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto kernel = channels_last ? backward_atomic_kernel<scalar_t, true> : backward_atomic_kernel<scalar_t, false>;
      kernel<<<roi_cuda::capped_blocks(total), roi_cuda::kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), boxes.data_ptr<scalar_t>(), total, s, acc_t(spatial_scale), int(sampling_ratio),
          aligned, grad_input.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return grad_input.to(grad.scalar_type());
  }

  // Sample counts on the device, offsets on the host (one small copy; this path syncs anyway to size its buffers).
  const int64_t num_rois = rois.size(0);
  at::Tensor counts = at::empty({num_rois, 2}, grad.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_sample_counts", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_counts_kernel<scalar_t><<<roi_cuda::capped_blocks(num_rois), roi_cuda::kThreads, 0, stream>>>(
        boxes.data_ptr<scalar_t>(), num_rois, s, acc_t(spatial_scale), int(sampling_ratio), aligned,
        counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor host_counts = counts.cpu();
  const int64_t* count_ptr = host_counts.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(num_rois + 1, 0);  // RoI k owns samples [offsets[k], offsets[k + 1])
  for (int64_t k = 0; k < num_rois; ++k) offsets[k + 1] = offsets[k] + count_ptr[2 * k] * count_ptr[2 * k + 1];
  if (offsets.back() == 0) return grad_input.to(grad.scalar_type());
  const at::Tensor sample_offset = at::tensor(offsets, at::kLong).to(grad.device());
  const int64_t invalid_cell = batch_size * height * width;
  // The RoIs go in chunks of at most kMaxChunkEntries contributions (a RoI with more samples on the map is a chunk
  // of its own), which bounds the scratch below (about 70 bytes a contribution, sort included). Chunks run in order on
  // the stream, each adding its per-cell sums, so the summation order is still fixed by the input alone.
  constexpr int64_t kMaxChunkEntries = int64_t(1) << 22;
  for (int64_t first = 0; first < num_rois;) {
    int64_t end = first + 1;
    while (end < num_rois && 4 * (offsets[end + 1] - offsets[first]) <= kMaxChunkEntries) ++end;
    const int64_t num_entries = 4 * (offsets[end] - offsets[first]);
    if (num_entries > 0) {
      add_chunk_contributions(g, boxes, counts, sample_offset, first, end - first, num_entries, s, spatial_scale,
                              sampling_ratio, aligned, invalid_cell, channels_last, grad_input);
    }
    first = end;
  }
  return grad_input.to(grad.scalar_type());
}

}  // namespace
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CUDA, m) {
  m.impl("roi_align", &normkit::roi_align_forward_cuda);
  m.impl("_roi_align_backward", &normkit::roi_align_backward_cuda);
}
