// Greedy non-maximum suppression on CPU, plain and per category (batched); IoU and the suppression rule come
// from csrc/common/roi_geometry.h, shared with the CUDA kernel.
//
// Batched NMS visits the boxes grouped by category (by score within each), so each box is compared only with
// the boxes of its own category: O(sum of n_c^2) IoUs, and no coordinate shifting that inf/NaN boxes, huge
// coordinates or large category ids could break.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "common/roi_checks.h"
#include "common/roi_geometry.h"

namespace normkit {
namespace {

// `categories` undefined: plain NMS (one category).
at::Tensor nms_kernel(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& categories,
                      double iou_threshold, int64_t offset) {
  const auto long_options = dets.options().dtype(at::kLong);
  if (dets.size(0) == 0) return at::empty({0}, long_options);
  const int64_t n = dets.size(0);
  // Stable: among equal scores the box that comes first in the input is visited first.
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  // rank[i]: position in `order` of the i-th visited box. A stable sort by category keeps the score order
  // within each category.
  at::Tensor rank, visit_category;
  if (categories.defined()) {
    const auto by_category =
        categories.to(at::kLong).index_select(0, order).sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
    visit_category = std::get<0>(by_category).contiguous();
    rank = std::get<1>(by_category);
  } else {
    rank = at::arange(n, long_options);
  }
  const int64_t* category = visit_category.defined() ? visit_category.const_data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> kept_ranks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dets.scalar_type(), "nms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor visited = dets.index_select(0, order.index_select(0, rank))
                                   .to(c10::CppTypeToScalarType<acc_t>::value)
                                   .contiguous();
    const acc_t* boxes = visited.const_data_ptr<acc_t>();
    const int64_t* rank_ptr = rank.const_data_ptr<int64_t>();
    const acc_t off = acc_t(offset), threshold = acc_t(iou_threshold);
    std::vector<acc_t> areas(n);
    for (int64_t i = 0; i < n; ++i) areas[i] = roi::box_area(boxes + 4 * i, off);
    std::vector<char> suppressed(n, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (suppressed[i]) continue;
      kept_ranks.push_back(rank_ptr[i]);
      for (int64_t j = i + 1; j < n && (category == nullptr || category[j] == category[i]); ++j) {
        if (suppressed[j]) continue;
        const acc_t iou = roi::box_iou(boxes + 4 * i, areas[i], boxes + 4 * j, areas[j], off);
        if (roi::nms_suppresses(iou, threshold, int(offset))) suppressed[j] = 1;
      }
    }
  });
  // Kept boxes by decreasing score (ties in input order): ascending rank in `order`.
  const at::Tensor kept = std::get<0>(at::tensor(kept_ranks, long_options).sort());
  return order.index_select(0, kept);
}

at::Tensor nms_cpu(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold, int64_t offset) {
  roi::check_nms_inputs(dets, scores, offset);
  return nms_kernel(dets, scores, at::Tensor(), iou_threshold, offset);
}

at::Tensor batched_nms_cpu(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& idxs,
                           double iou_threshold, int64_t offset) {
  roi::check_nms_inputs(dets, scores, offset);
  roi::check_nms_categories(idxs, dets);
  return nms_kernel(dets, scores, idxs, iou_threshold, offset);
}

}  // namespace
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("nms", &normkit::nms_cpu);
  m.impl("batched_nms", &normkit::batched_nms_cpu);
}
