// Batched NMS over groups of whole categories (host code, any device).
//
// Boxes of different categories never suppress each other, so batched NMS may run on any partition of the
// categories and merge the kept boxes afterwards. The CUDA kernel's suppression bitmask holds a bit for every pair
// of the boxes it is given: one pass over an LVIS-sized candidate set (1.2M boxes in 1203 categories) would need
// a 180 GB mask. Run over groups of at most `max_group_boxes` boxes (a larger category is a group of its own), it
// needs O(sum of group sizes^2) bits and IoUs instead of O(N^2), and the result is the same.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace normkit {
namespace roi {

// `batched_nms(dets, scores, idxs, iou_threshold, offset)` returns the kept indices in decreasing score order,
// equal scores in input order; so does this, running it on one group of whole categories at a time.
template <typename BatchedNms>
at::Tensor batched_nms_in_groups(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& idxs,
                                 double iou_threshold, int64_t offset, int64_t max_group_boxes,
                                 BatchedNms batched_nms) {
  TORCH_CHECK(max_group_boxes > 0, "batched_nms: max_group_boxes must be positive, got ", max_group_boxes);
  const int64_t n = dets.size(0);
  if (n <= max_group_boxes) return batched_nms(dets, scores, idxs, iou_threshold, offset);
  // The boxes by category; within a category in input order (a stable sort), so each group's own score sort
  // breaks ties as the one pass over all boxes would.
  const auto [sorted_idxs, by_category] = idxs.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor category_sizes =
      std::get<2>(at::unique_consecutive(sorted_idxs, /*return_inverse=*/false, /*return_counts=*/true)).cpu();
  const int64_t* sizes = category_sizes.const_data_ptr<int64_t>();
  std::vector<int64_t> group_ends;  // in the category order; a group is [previous end, end)
  int64_t end = 0, group_start = 0;
  for (int64_t c = 0; c < category_sizes.numel(); ++c) {
    if (end > group_start && end + sizes[c] - group_start > max_group_boxes) {
      group_ends.push_back(end);
      group_start = end;
    }
    end += sizes[c];
  }
  group_ends.push_back(end);
  if (group_ends.size() == 1) return batched_nms(dets, scores, idxs, iou_threshold, offset);
  std::vector<at::Tensor> kept;
  int64_t start = 0;
  for (const int64_t group_end : group_ends) {
    const at::Tensor members = by_category.slice(0, start, group_end);
    const at::Tensor group_kept = batched_nms(dets.index_select(0, members), scores.index_select(0, members),
                                              idxs.index_select(0, members), iou_threshold, offset);
    kept.push_back(members.index_select(0, group_kept));
    start = group_end;
  }
  // Merge as the one pass orders them: decreasing score, equal scores (and NaNs) in input order.
  const at::Tensor merged = std::get<0>(at::cat(kept).sort());
  const at::Tensor order = std::get<1>(scores.index_select(0, merged).sort(/*stable=*/true, /*dim=*/0,
                                                                            /*descending=*/true));
  return merged.index_select(0, order);
}

}  // namespace roi
}  // namespace normkit
