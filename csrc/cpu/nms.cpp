// Greedy non-maximum suppression on CPU (DESIGN.md §4); IoU and the suppression rule come from
// csrc/common/roi_geometry.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "common/roi_checks.h"
#include "common/roi_geometry.h"

namespace normkit {
namespace {

at::Tensor nms_cpu(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold, int64_t offset) {
  roi::check_nms_inputs(dets, scores, offset);
  if (dets.size(0) == 0) return at::empty({0}, dets.options().dtype(at::kLong));
  // Stable: among equal scores the box that comes first in the input is visited first.
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const int64_t n = dets.size(0);
  std::vector<int64_t> keep;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dets.scalar_type(), "nms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor sorted = dets.index_select(0, order).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* boxes = sorted.data_ptr<acc_t>();
    const acc_t off = acc_t(offset), threshold = acc_t(iou_threshold);
    std::vector<acc_t> areas(n);
    for (int64_t i = 0; i < n; ++i) areas[i] = roi::box_area(boxes + 4 * i, off);
    std::vector<char> suppressed(n, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (suppressed[i]) continue;
      keep.push_back(i);
      for (int64_t j = i + 1; j < n; ++j) {
        if (suppressed[j]) continue;
        const acc_t iou = roi::box_iou(boxes + 4 * i, areas[i], boxes + 4 * j, areas[j], off);
        if (roi::nms_suppresses(iou, threshold, int(offset))) suppressed[j] = 1;
      }
    }
  });
  const at::Tensor kept = at::tensor(keep, dets.options().dtype(at::kLong));
  return order.index_select(0, kept);
}

}  // namespace
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CPU, m) { m.impl("nms", &normkit::nms_cpu); }
