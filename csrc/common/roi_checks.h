// Host-side argument checks and layout choices shared by the CPU and CUDA ROI kernels. The Python front
// end (normkit/ops) checks the same things with friendlier messages; these keep direct torch.ops calls safe.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "common/roi_geometry.h"

namespace normkit {
namespace roi {

inline void check_rois(const at::Tensor& input, const at::Tensor& rois, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be Tensor[N, C, H, W], got ", input.dim(), " dims");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be Tensor[K, 5], got ", rois.sizes());
  TORCH_CHECK(input.device() == rois.device(), op, ": input and rois must be on the same device, got ",
              input.device(), " and ", rois.device());
  TORCH_CHECK(input.scalar_type() == rois.scalar_type(), op, ": input and rois must have the same dtype, got ",
              input.scalar_type(), " and ", rois.scalar_type());
}

inline void check_roi_grad(const at::Tensor& grad, const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w,
                           int64_t channels, const char* op) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be Tensor[K, 5], got ", rois.sizes());
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              op, ": grad must be Tensor[", rois.size(0), ", ", channels, ", ", pooled_h, ", ", pooled_w, "], got ",
              grad.sizes());
  TORCH_CHECK(grad.device() == rois.device() && grad.scalar_type() == rois.scalar_type(), op,
              ": grad and rois must share device and dtype, got ", grad.device(), "/", grad.scalar_type(), " and ",
              rois.device(), "/", rois.scalar_type());
}

inline void check_roi_pool_argmax(const at::Tensor& argmax, const at::Tensor& grad) {
  TORCH_CHECK(argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kInt,
              "_roi_pool_backward: argmax must be an int32 tensor shaped like grad ", grad.sizes(), ", got ",
              argmax.scalar_type(), argmax.sizes());
  TORCH_CHECK(argmax.device() == grad.device(), "_roi_pool_backward: argmax must be on the device of grad (",
              grad.device(), "), got ", argmax.device());
}

// RoIPool keeps each output's argmax as an int32 cell index within its plane (as torchvision does): half the
// memory traffic of int64 in a forward that mostly writes outputs. Planes must therefore hold < 2^31 cells.
inline void check_pool_plane(int64_t height, int64_t width, const char* op) {
  TORCH_CHECK(height * width <= int64_t(std::numeric_limits<int32_t>::max()), op,
              ": feature maps must have fewer than 2^31 cells per channel, got ", height, " x ", width);
}

inline void check_nms_inputs(const at::Tensor& dets, const at::Tensor& scores, int64_t offset) {
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4, "nms: boxes must be Tensor[N, 4], got ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == dets.size(0), "nms: scores must be Tensor[", dets.size(0),
              "], got ", scores.sizes());
  TORCH_CHECK(dets.device() == scores.device(), "nms: boxes and scores must be on the same device, got ",
              dets.device(), " and ", scores.device());
  TORCH_CHECK(dets.scalar_type() == scores.scalar_type(), "nms: boxes and scores must have the same dtype, got ",
              dets.scalar_type(), " and ", scores.scalar_type());
  TORCH_CHECK(offset == 0 || offset == 1, "nms: offset must be 0 or 1, got ", offset);
}

inline void check_nms_categories(const at::Tensor& idxs, const at::Tensor& dets) {
  TORCH_CHECK(idxs.dim() == 1 && idxs.size(0) == dets.size(0), "batched_nms: idxs must be Tensor[", dets.size(0),
              "] (one category per box), got ", idxs.sizes());
  TORCH_CHECK(!at::isFloatingType(idxs.scalar_type()) && !at::isComplexType(idxs.scalar_type()) &&
                  idxs.scalar_type() != at::kBool,
              "batched_nms: idxs must hold integer category indices, got ", idxs.scalar_type());
  TORCH_CHECK(idxs.device() == dets.device(), "batched_nms: idxs must be on the device of boxes (", dets.device(),
              "), got ", idxs.device());
}

// The kernels index bins and coordinates with int: a larger size, or more bins than an int holds, would wrap.
inline void check_pooled_size(int64_t pooled_h, int64_t pooled_w, const char* op) {
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op, ": output size must be positive, got (", pooled_h, ", ", pooled_w,
              ")");
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK(pooled_h <= kMaxInt / pooled_w, op, ": output size must have fewer than 2^31 bins, got (", pooled_h,
              ", ", pooled_w, ")");
}

inline void check_feature_size(int64_t batch, int64_t channels, int64_t height, int64_t width, const char* op) {
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK(batch >= 0 && channels >= 0 && height >= 0 && width >= 0, op,
              ": feature map sizes must be non-negative, got (", batch, ", ", channels, ", ", height, ", ", width, ")");
  TORCH_CHECK(batch <= kMaxInt && channels <= kMaxInt && height <= kMaxInt && width <= kMaxInt, op,
              ": feature map sizes must be below 2^31, got (", batch, ", ", channels, ", ", height, ", ", width, ")");
}

// Image-to-feature scale: a negative, zero, NaN or infinite scale has no meaning (and would flip boxes).
inline void check_spatial_scale(double spatial_scale, const char* op) {
  TORCH_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0, op,
              ": spatial_scale must be a positive finite number, got ", spatial_scale);
}

// An explicit sampling ratio is capped like the adaptive grid: it is converted to int (2^40 would wrap to 0),
// and the work per bin grows with its square.
inline void check_sampling_ratio(int64_t sampling_ratio, const char* op) {
  TORCH_CHECK(sampling_ratio <= kMaxAdaptiveGrid && sampling_ratio >= std::numeric_limits<int>::min(), op,
              ": sampling_ratio must be at most ", kMaxAdaptiveGrid,
              " samples per bin and axis (<= 0 for adaptive, down to -2^31), got ", sampling_ratio);
}

// Everything the RoIAlign kernels (forward and backward, CPU and CUDA) index or convert to int.
inline void check_align_arguments(double spatial_scale, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                                  const char* op) {
  check_pooled_size(pooled_h, pooled_w, op);
  check_spatial_scale(spatial_scale, op);
  check_sampling_ratio(sampling_ratio, op);
}

// Batch indices must be integers in [0, batch); the CPU kernels check before reading (CUDA kernels instead
// give a RoI with an invalid index an all-zero output, as they cannot check without a device sync).
inline void check_batch_indices(const at::Tensor& rois, int64_t batch, const char* op) {
  if (rois.size(0) == 0) return;
  const at::Tensor idx = rois.select(1, 0);
  const bool ok = ((idx >= 0) & (idx < batch) & (idx == idx.floor())).all().item<bool>();
  TORCH_CHECK(ok, op, ": rois[:, 0] must hold integer batch indices in [0, ", batch, ")");
}

// Spatial kernels keep a channels_last input channels_last (and write channels_last outputs); every other
// layout is made NCHW-contiguous. Mirrored by normkit.ops._roi_common.is_channels_last.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat kernel_memory_format(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace roi
}  // namespace normkit
