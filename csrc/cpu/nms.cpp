// Greedy non-maximum suppression on CPU, plain and per category (batched); IoU and the suppression rule come
// from csrc/common/roi_geometry.h, shared with the CUDA kernel.
//
// Batched NMS visits the boxes grouped by category (by score within each), so each box is compared only with
// the boxes of its own category: O(sum of n_c^2) IoUs, and no coordinate shifting that inf/NaN boxes, huge
// coordinates or large category ids could break. Categories are independent, so they run in parallel.
//
// Within a category the candidates live in coordinate arrays (x1, y1, x2, y2, area) in visit order. Each step
// keeps the front candidate, computes its IoU with every later candidate in one branch-free (vectorised) pass,
// and compacts the survivors to the front, so later steps never look at a suppressed box again: clustered
// proposals, where most boxes are suppressed early, cost little more than the kept boxes' rows.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/nms_groups.h"
#include "common/roi_checks.h"
#include "common/roi_geometry.h"

namespace normkit {
namespace {

// Boxes [begin, end) of the visit order, as coordinate arrays.
template <typename T>
struct Candidates {
  T* x1;
  T* y1;
  T* x2;
  T* y2;
  T* area;
  int64_t* position;  // index in the visit order
};

// Greedy NMS over one category's candidates (destroyed: survivors are compacted in place); appends the kept
// positions, in visit order, to `kept`. `suppressed` is scratch of at least `count` bytes. `kOffset` is a template
// argument so that the suppression rule is a constant inside the vectorised loop.
template <int kOffset, typename T>
void greedy_nms(Candidates<T> c, int64_t count, T threshold, uint8_t* suppressed, std::vector<int64_t>& kept) {
  const T offset = T(kOffset);
  int64_t front = 0, end = count;
  while (front < end) {
    const int64_t k = front++;
    kept.push_back(c.position[k]);
    const T kx1 = c.x1[k], ky1 = c.y1[k], kx2 = c.x2[k], ky2 = c.y2[k], karea = c.area[k];
    for (int64_t j = front; j < end; ++j) {
      const T iou = roi::box_iou(kx1, ky1, kx2, ky2, karea, c.x1[j], c.y1[j], c.x2[j], c.y2[j], c.area[j], offset);
      suppressed[j] = roi::nms_suppresses(iou, threshold, kOffset);
    }
    const void* first = std::memchr(suppressed + front, 1, size_t(end - front));
    if (first == nullptr) continue;  // nothing suppressed: nothing to move
    int64_t write = static_cast<const uint8_t*>(first) - suppressed;
    for (int64_t j = write + 1; j < end; ++j) {
      c.x1[write] = c.x1[j];
      c.y1[write] = c.y1[j];
      c.x2[write] = c.x2[j];
      c.y2[write] = c.y2[j];
      c.area[write] = c.area[j];
      c.position[write] = c.position[j];
      write += 1 - suppressed[j];
    }
    end = write;
  }
}

// `categories` undefined: plain NMS (one category).
at::Tensor nms_kernel(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& categories,
                      double iou_threshold, int64_t offset) {
  const auto long_options = dets.options().dtype(at::kLong);
  if (dets.size(0) == 0) return at::empty({0}, long_options);
  const int64_t n = dets.size(0);
  // Stable: among equal scores the box that comes first in the input is visited first.
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  // visit[i]: the input box visited i-th. A stable sort by category keeps the score order within each category;
  // rank[i] is the visited box's position in `order` (its place in the output, which is by score).
  at::Tensor rank, visit_category, visit;
  if (categories.defined()) {
    const auto by_category =
        categories.to(at::kLong).index_select(0, order).sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
    visit_category = std::get<0>(by_category).contiguous();
    rank = std::get<1>(by_category).contiguous();
    visit = order.index_select(0, rank);
  } else {
    visit = order;
  }
  // Segments of equal category in the visit order.
  std::vector<int64_t> segment_begin{0};
  if (visit_category.defined()) {
    const int64_t* category = visit_category.const_data_ptr<int64_t>();
    for (int64_t i = 1; i < n; ++i) {
      if (category[i] != category[i - 1]) segment_begin.push_back(i);
    }
  }
  segment_begin.push_back(n);
  const int64_t num_segments = int64_t(segment_begin.size()) - 1;
  std::vector<std::vector<int64_t>> kept(num_segments);
  const at::Tensor boxes = dets.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dets.scalar_type(), "nms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* box = boxes.const_data_ptr<scalar_t>();
    const int64_t* visit_ptr = visit.const_data_ptr<int64_t>();
    std::vector<acc_t> coordinates(5 * size_t(n));
    std::vector<int64_t> positions(n);
    std::vector<uint8_t> suppressed(n);
    const Candidates<acc_t> all{coordinates.data(), coordinates.data() + n, coordinates.data() + 2 * n,
                                coordinates.data() + 3 * n, coordinates.data() + 4 * n, positions.data()};
    const acc_t off = acc_t(offset), threshold = acc_t(iou_threshold);
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* b = box + 4 * visit_ptr[i];
      const acc_t corners[4] = {acc_t(b[0]), acc_t(b[1]), acc_t(b[2]), acc_t(b[3])};
      all.x1[i] = corners[0];
      all.y1[i] = corners[1];
      all.x2[i] = corners[2];
      all.y2[i] = corners[3];
      all.area[i] = roi::box_area(corners, off);
      all.position[i] = i;
    }
    // One category per task: small categories are too cheap to split further, and a single large one is a
    // sequential greedy chain.
    const int64_t grain = n < 2048 ? num_segments : 1;
    at::parallel_for(0, num_segments, grain, [&](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        const int64_t begin = segment_begin[s];
        const Candidates<acc_t> segment{all.x1 + begin,   all.y1 + begin,   all.x2 + begin,
                                        all.y2 + begin,   all.area + begin, all.position + begin};
        const int64_t count = segment_begin[s + 1] - begin;
        if (offset == 1) {
          greedy_nms<1>(segment, count, threshold, suppressed.data() + begin, kept[s]);
        } else {
          greedy_nms<0>(segment, count, threshold, suppressed.data() + begin, kept[s]);
        }
      }
    });
  });
  // Kept boxes by decreasing score (ties in input order): ascending rank in `order`.
  std::vector<int64_t> kept_ranks;
  for (const auto& segment : kept) {
    for (const int64_t position : segment) {
      kept_ranks.push_back(rank.defined() ? rank.const_data_ptr<int64_t>()[position] : position);
    }
  }
  if (num_segments > 1) std::sort(kept_ranks.begin(), kept_ranks.end());
  at::Tensor result = at::empty({int64_t(kept_ranks.size())}, long_options);
  const int64_t* order_ptr = order.const_data_ptr<int64_t>();
  int64_t* out = result.mutable_data_ptr<int64_t>();
  for (size_t i = 0; i < kept_ranks.size(); ++i) out[i] = order_ptr[kept_ranks[i]];
  return result;
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

at::Tensor batched_nms_in_groups_cpu(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& idxs,
                                     double iou_threshold, int64_t offset, int64_t max_group_boxes) {
  roi::check_nms_inputs(dets, scores, offset);
  roi::check_nms_categories(idxs, dets);
  return roi::batched_nms_in_groups(dets, scores, idxs, iou_threshold, offset, max_group_boxes, &nms_kernel);
}

}  // namespace
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("nms", &normkit::nms_cpu);
  m.impl("batched_nms", &normkit::batched_nms_cpu);
  m.impl("_batched_nms_in_groups", &normkit::batched_nms_in_groups_cpu);
}
