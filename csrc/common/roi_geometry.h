// RoIAlign / RoIPool / NMS geometry shared by the CPU and CUDA kernels.
//
// Everything here is per-RoI or per-sample arithmetic with no knowledge of memory layout or launch
// structure, so the CPU tests exercise exactly the arithmetic the GPU runs. `T` is the accumulation type
// (float for half/bfloat16 inputs, otherwise the input type).
#pragma once

#include <c10/macros/Macros.h>

#include <math.h>

namespace normkit {
namespace roi {

// Caps the adaptive RoIAlign sample grid (per bin and axis): far beyond any real feature map, it only
// keeps absurd finite box sizes from overflowing the int conversion.
constexpr int kMaxAdaptiveGrid = 1 << 16;
// RoIPool rounds coordinates to int; values are clamped to this magnitude first for the same reason.
constexpr float kMaxPoolCoordinate = float(1 << 24);

template <typename T>
C10_HOST_DEVICE inline T min_of(T a, T b) { return b < a ? b : a; }

template <typename T>
C10_HOST_DEVICE inline T max_of(T a, T b) { return a < b ? b : a; }

// a * b rounded on its own on every device. nvcc contracts a product followed by an add into one fused
// multiply-add by default (the CPU kernels, built for the x86-64 baseline, have none), which moves sample points
// and IoUs by an ulp: the GPU would then keep a different box set than the CPU and torchvision's CPU kernel when
// an IoU lies at the threshold. __fmul_rn/__dmul_rn are never contracted.
template <typename T>
C10_HOST_DEVICE inline T mul_rn(T a, T b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(T) == sizeof(double)) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// The image a RoI reads: its batch index when that is an integer in [0, batch), else -1. The CPU kernels refuse
// other values (check_batch_indices); the CUDA kernels, which cannot raise, give such a RoI zeros.
template <typename T>
C10_HOST_DEVICE inline int roi_batch_index(T value, int batch) {
  return value >= T(0) && value < T(batch) && value == floor(value) ? int(value) : -1;
}

// False for NaN and +-inf (inf - inf and NaN - NaN are NaN); does not depend on <cmath> overloads on device.
template <typename T>
C10_HOST_DEVICE inline bool is_finite(T v) { return v - v == T(0); }

// ---- RoIAlign ----

// One RoI in feature-map coordinates, as RoIAlign samples it.
template <typename T>
struct AlignRegion {
  T start_h, start_w;  // top-left corner
  T bin_h, bin_w;      // bin size
  int grid_h, grid_w;  // samples per bin along each axis
  T count;             // divisor of the bin average: max(grid_h * grid_w, 1)
};

// Samples per bin along one axis: `sampling_ratio` when positive, else ceil(roi_size / pooled).
// A non-finite size takes no samples, so NaN/inf boxes pool to 0 instead of overflowing the int conversion;
// a negative size (possible with aligned=true) takes none either, as the sample loop of the definition
// would not run.
template <typename T>
C10_HOST_DEVICE inline int align_grid_size(T roi_size, int pooled, int sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  if (!is_finite(roi_size)) return 0;
  const T grid = ceil(roi_size / T(pooled));
  if (!(grid > T(0))) return 0;
  return grid < T(kMaxAdaptiveGrid) ? int(grid) : kMaxAdaptiveGrid;
}

// `box` points at (x1, y1, x2, y2) in image coordinates.
template <typename T>
C10_HOST_DEVICE inline AlignRegion<T> align_region(const T* box, T spatial_scale, int pooled_h, int pooled_w,
                                                   int sampling_ratio, bool aligned) {
  // aligned=true shifts by half a pixel so that pixel centres, not corners, sit on integer coordinates.
  const T shift = aligned ? T(0.5) : T(0);
  AlignRegion<T> r;
  r.start_w = mul_rn(box[0], spatial_scale) - shift;
  r.start_h = mul_rn(box[1], spatial_scale) - shift;
  T roi_w = mul_rn(box[2], spatial_scale) - shift - r.start_w;
  T roi_h = mul_rn(box[3], spatial_scale) - shift - r.start_h;
  if (!aligned) {  // legacy behaviour: tiny or inverted boxes are forced to 1x1
    roi_w = roi_w < T(1) ? T(1) : roi_w;  // NaN stays NaN (the comparison is false)
    roi_h = roi_h < T(1) ? T(1) : roi_h;
  }
  r.bin_h = roi_h / T(pooled_h);
  r.bin_w = roi_w / T(pooled_w);
  r.grid_h = align_grid_size(roi_h, pooled_h, sampling_ratio);
  r.grid_w = align_grid_size(roi_w, pooled_w, sampling_ratio);
  r.count = max_of(T(r.grid_h) * T(r.grid_w), T(1));
  return r;
}

// Sample point `i` (of `grid` samples) of bin `p` along one axis. Not rounded: the grid stays continuous.
template <typename T>
C10_HOST_DEVICE inline T align_sample_coordinate(T start, T bin, int p, int i, int grid) {
  return start + mul_rn(T(p), bin) + mul_rn(T(i) + T(0.5), bin) / T(grid);
}

// Smallest i in [0, count) for which `pred(i)` is false, `pred` being true on a prefix (count when never false).
template <typename Pred>
C10_HOST_DEVICE inline int partition_point(int count, Pred pred) {
  int low = 0, high = count;
  while (low < high) {
    const int mid = low + (high - low) / 2;
    if (pred(mid)) {
      low = mid + 1;
    } else {
      high = mid;
    }
  }
  return low;
}

// Grids up to this many samples per axis are walked whole: a search would cost more than it skips.
constexpr int kSampleSearchGrid = 8;

// The samples [*first, *last) of bin p along one axis that may land in [-1, size]; every other sample fails
// linear_sample. A box far larger than the map (an adaptive grid of up to 65536 samples per axis) thus costs
// only its samples on the map. Sample coordinates are monotone in i (rounding is monotone), so those samples
// form one interval, found by binary search with the same coordinate arithmetic and limits as linear_sample.
// Callers still test each sample; a NaN axis yields an empty range.
template <typename T>
C10_HOST_DEVICE inline void align_sample_range(T start, T bin, int p, int grid, int size, int* first, int* last) {
  if (grid <= kSampleSearchGrid) {
    *first = 0;
    *last = grid;
    return;
  }
  const auto coordinate = [&](int i) { return align_sample_coordinate(start, bin, p, i, grid); };
  if (bin >= T(0)) {  // non-decreasing: samples before the map, on it, beyond it
    *first = partition_point(grid, [&](int i) { return coordinate(i) < T(-1); });
    *last = partition_point(grid, [&](int i) { return coordinate(i) <= T(size); });
  } else {  // non-increasing (aligned=true inverted boxes), or NaN
    *first = partition_point(grid, [&](int i) { return coordinate(i) > T(size); });
    *last = partition_point(grid, [&](int i) { return coordinate(i) >= T(-1); });
  }
}

// The four neighbours of a bilinear sample and their weights; `spatial index = y * width + x`.
template <typename T>
struct BilinearSample {
  int y_low, y_high, x_low, x_high;
  T w_ll, w_lh, w_hl, w_hh;  // weights of (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high)
};

// Linear interpolation along one axis of `size` cells: the two neighbours of coordinate `v` and their weights.
// Returns false (the sample contributes 0) for a point outside [-1, size], a NaN point, or an empty axis.
// Inside, coordinates below 0 clamp to 0 and the last cell clamps to size - 1.
template <typename T>
C10_HOST_DEVICE inline bool linear_sample(T v, int size, int& low, int& high, T& w_low, T& w_high) {
  if (size <= 0 || !(v >= T(-1) && v <= T(size))) return false;
  v = max_of(v, T(0));
  low = int(v);
  if (low >= size - 1) {
    low = high = size - 1;
    v = T(low);
  } else {
    high = low + 1;
  }
  w_high = v - T(low);
  w_low = T(1) - w_high;
  return true;
}

// Bilinear interpolation is separable: the product of the two axes' linear interpolations. The CPU kernels
// use linear_sample per axis (a RoI's x and y samples are shared by whole bin rows and columns).
template <typename T>
C10_HOST_DEVICE inline bool bilinear_sample(T y, T x, int height, int width, BilinearSample<T>& s) {
  T hy, ly, hx, lx;
  if (!linear_sample(y, height, s.y_low, s.y_high, hy, ly)) return false;
  if (!linear_sample(x, width, s.x_low, s.x_high, hx, lx)) return false;
  s.w_ll = hy * hx;
  s.w_lh = hy * lx;
  s.w_hl = ly * hx;
  s.w_hh = ly * lx;
  return true;
}

// ---- RoIPool ----

// One RoI in feature-map cells as RoIPool sees it: rounded corners, size at least 1x1.
template <typename T>
struct PoolRegion {
  int start_h, start_w;
  T bin_h, bin_w;
  bool valid;  // false for non-finite coordinates: every bin is then empty
};

// Rounds half away from zero (C `round`), after clamping so the int conversion cannot overflow.
template <typename T>
C10_HOST_DEVICE inline int round_coordinate(T v) {
  const T limit = T(kMaxPoolCoordinate);
  return int(round(min_of(max_of(v, -limit), limit)));
}

template <typename T>
C10_HOST_DEVICE inline PoolRegion<T> pool_region(const T* box, T spatial_scale, int pooled_h, int pooled_w) {
  PoolRegion<T> r;
  r.valid = is_finite(box[0] * spatial_scale) && is_finite(box[1] * spatial_scale) &&
            is_finite(box[2] * spatial_scale) && is_finite(box[3] * spatial_scale);
  if (!r.valid) {
    r.start_h = r.start_w = 0;
    r.bin_h = r.bin_w = T(0);
    return r;
  }
  r.start_w = round_coordinate(box[0] * spatial_scale);
  r.start_h = round_coordinate(box[1] * spatial_scale);
  const int end_w = round_coordinate(box[2] * spatial_scale);
  const int end_h = round_coordinate(box[3] * spatial_scale);
  // Inclusive end: a box whose corners round to the same cell still covers that cell.
  r.bin_w = T(max_of(end_w - r.start_w + 1, 1)) / T(pooled_w);
  r.bin_h = T(max_of(end_h - r.start_h + 1, 1)) / T(pooled_h);
  return r;
}

// Cell range [begin, end) of bin `p` along one axis, clipped to [0, size).
template <typename T>
C10_HOST_DEVICE inline void pool_bin_range(int start, T bin, int p, int size, int& begin, int& end) {
  begin = min_of(max_of(int(floor(T(p) * bin)) + start, 0), size);
  end = min_of(max_of(int(ceil(T(p + 1) * bin)) + start, 0), size);
}

// Max over the bin [h0, h1) x [w0, w1) of a (height x width) plane: returns the flat index of the first maximum
// and stores its value; a NaN propagates (the first NaN wins), as torch.max does.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline int64_t bin_argmax(const scalar_t* plane, int width, int h0, int h1, int w0, int w1,
                                          acc_t& best_val) {
  // 64-bit cell offsets and pointers walking the rows: int counters would be sign-extended again on every step
  // wherever the build keeps Python's -fwrapv (setup.py removes it; other builds may not).
  int64_t best = int64_t(h0) * width + w0;
  best_val = acc_t(plane[best]);
  // One comparison per cell on the common path; NaNs are only noted, and the rare bin that has one is scanned
  // again for the first.
  bool saw_nan = false;
  for (int64_t row = int64_t(h0) * width; row < int64_t(h1) * width; row += width) {
    const scalar_t* cells = plane + row;
    for (int64_t w = w0; w < w1; ++w) {
      const acc_t v = acc_t(cells[w]);
      if (v > best_val) {
        best_val = v;
        best = row + w;
      }
      saw_nan |= v != v;
    }
  }
  if (saw_nan) {
    for (int64_t row = int64_t(h0) * width; row < int64_t(h1) * width; row += width) {
      for (int64_t w = w0; w < w1; ++w) {
        const acc_t v = acc_t(plane[row + w]);
        if (v != v) {
          best_val = v;
          return row + w;
        }
      }
    }
  }
  return best;
}

// ---- NMS ----

// `offset` is 0 (torchvision: areas without +1) or 1 (Detectron legacy: inclusive pixel boxes).
template <typename T>
C10_HOST_DEVICE inline T box_area(const T* b, T offset) {
  return mul_rn(b[2] - b[0] + offset, b[3] - b[1] + offset);
}

// IoU from scalar coordinates: the CPU kernel keeps its boxes as separate coordinate arrays so that a row of
// IoUs vectorises. Same operations in the same order as torchvision's CPU kernel, with no fused multiply-add on
// any device (mul_rn), so finite boxes keep exactly its set.
template <typename T>
C10_HOST_DEVICE inline T box_iou(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b,
                                 T offset) {
  const T w = max_of(min_of(ax2, bx2) - max_of(ax1, bx1) + offset, T(0));
  const T h = max_of(min_of(ay2, by2) - max_of(ay1, by1) + offset, T(0));
  const T inter = mul_rn(w, h);
  return inter / (area_a + area_b - inter);
}

template <typename T>
C10_HOST_DEVICE inline T box_iou(const T* a, T area_a, const T* b, T area_b, T offset) {
  return box_iou(a[0], a[1], a[2], a[3], area_a, b[0], b[1], b[2], b[3], area_b, offset);
}

// torchvision suppresses IoU > threshold; the Detectron legacy NMS (offset 1) suppresses IoU >= threshold.
// A NaN IoU (two empty boxes) never suppresses.
template <typename T>
C10_HOST_DEVICE inline bool nms_suppresses(T iou, T threshold, int offset) {
  return offset == 1 ? iou >= threshold : iou > threshold;
}

}  // namespace roi
}  // namespace normkit
