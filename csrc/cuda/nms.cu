// Greedy NMS on CUDA, plain and per category (batched); IoU and the suppression rule from
// csrc/common/roi_geometry.h.
//
// Boxes are sorted by score, then:
//  1. mask kernel: for every pair of 64-box blocks (row block <= column block) one thread per row box sets bit
//     j of mask[i][column block] when box i suppresses box j (j > i; for batched NMS only within a category);
//  2. reduce kernel: a single block walks the boxes in score order, 64 at a time; one thread resolves the
//     block's own 64 boxes sequentially, then all threads OR the kept boxes' rows into the `removed` bitmap.
// Only the kept flags are produced on the device; one copy of the kept count sizes the output.
// The mask holds a bit per pair of boxes: batched NMS above kMaxMaskBoxes boxes runs over groups of whole
// categories (common/nms_groups.h), as the CPU kernel visits categories one by one.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/nms_groups.h"
#include "common/roi_checks.h"
#include "common/roi_geometry.h"
#include "cuda/roi_launch.cuh"

namespace normkit {
namespace {

constexpr int kBoxesPerWord = 64;  // one bit per box in a uint64 mask word; also the mask kernel's block size
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxMaskBoxes = 4096;  // a 2 MB mask

template <typename scalar_t>
__global__ void mask_kernel(const scalar_t* __restrict__ boxes, const int64_t* __restrict__ categories, int64_t n,
                            int64_t words_per_row, at::opmath_type<scalar_t> threshold, int offset,
                            uint64_t* __restrict__ mask) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t column_boxes[kBoxesPerWord * 4];
  __shared__ int64_t column_categories[kBoxesPerWord];
  const acc_t off = acc_t(offset);
  const int64_t tiles = words_per_row * words_per_row;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row_block = tile / words_per_row, col_block = tile % words_per_row;
    if (col_block < row_block) continue;  // uniform across the block: boxes only suppress later boxes
    const int rows = int(min(int64_t(kBoxesPerWord), n - row_block * kBoxesPerWord));
    const int cols = int(min(int64_t(kBoxesPerWord), n - col_block * kBoxesPerWord));
    __syncthreads();  // the previous tile's readers are done with column_boxes
    if (threadIdx.x < cols) {
      const scalar_t* b = boxes + (col_block * kBoxesPerWord + threadIdx.x) * 4;
      for (int d = 0; d < 4; ++d) column_boxes[threadIdx.x * 4 + d] = acc_t(b[d]);
      if (categories != nullptr) column_categories[threadIdx.x] = categories[col_block * kBoxesPerWord + threadIdx.x];
    }
    __syncthreads();
    if (threadIdx.x < rows) {
      const int64_t i = row_block * kBoxesPerWord + threadIdx.x;
      acc_t box[4];
      for (int d = 0; d < 4; ++d) box[d] = acc_t(boxes[i * 4 + d]);
      const acc_t area = roi::box_area(box, off);
      const int64_t category = categories != nullptr ? categories[i] : 0;
      uint64_t bits = 0;
      for (int j = row_block == col_block ? int(threadIdx.x) + 1 : 0; j < cols; ++j) {
        if (categories != nullptr && column_categories[j] != category) continue;
        const acc_t* other = column_boxes + j * 4;
        const acc_t iou = roi::box_iou(box, area, other, roi::box_area(other, off), off);
        if (roi::nms_suppresses(iou, threshold, offset)) bits |= uint64_t(1) << j;
      }
      mask[i * words_per_row + col_block] = bits;
    }
  }
}

__global__ void reduce_kernel(const uint64_t* __restrict__ mask, int64_t n, int64_t words_per_row,
                              uint64_t* __restrict__ removed, bool* __restrict__ keep) {
  __shared__ uint64_t diagonal[kBoxesPerWord];
  __shared__ uint64_t kept_bits;
  for (int64_t word = 0; word < words_per_row; ++word) {
    const int count = int(min(int64_t(kBoxesPerWord), n - word * kBoxesPerWord));
    // Load the block's own rows (independent loads) before the sequential pass over them.
    if (threadIdx.x < count) diagonal[threadIdx.x] = mask[(word * kBoxesPerWord + threadIdx.x) * words_per_row + word];
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t current = removed[word], kept = 0;
      for (int b = 0; b < count; ++b) {
        if (!((current >> b) & 1)) {
          kept |= uint64_t(1) << b;
          current |= diagonal[b];
        }
      }
      kept_bits = kept;
    }
    __syncthreads();
    const uint64_t kept = kept_bits;
    if (threadIdx.x < count) keep[word * kBoxesPerWord + threadIdx.x] = (kept >> threadIdx.x) & 1;
    for (int64_t j = word + 1 + threadIdx.x; j < words_per_row; j += blockDim.x) {
      uint64_t bits = removed[j];
      for (uint64_t rest = kept; rest != 0; rest &= rest - 1) {
        const int b = __ffsll(static_cast<long long>(rest)) - 1;
        bits |= mask[(word * kBoxesPerWord + b) * words_per_row + j];
      }
      removed[j] = bits;
    }
    __syncthreads();  // removed[word + 1] is read by thread 0 next
  }
}

// `categories` undefined: plain NMS (one category).
at::Tensor nms_kernel(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& categories,
                      double iou_threshold, int64_t offset) {
  c10::cuda::CUDAGuard guard(dets.device());
  if (dets.size(0) == 0) return at::empty({0}, dets.options().dtype(at::kLong));
  // Stable: among equal scores the box that comes first in the input is visited first (as on CPU).
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor sorted = dets.index_select(0, order).contiguous();
  const at::Tensor sorted_categories =
      categories.defined() ? categories.to(at::kLong).index_select(0, order).contiguous() : at::Tensor();
  const int64_t n = dets.size(0);
  const int64_t words_per_row = (n + kBoxesPerWord - 1) / kBoxesPerWord;
  at::Tensor mask = at::empty({n * words_per_row}, dets.options().dtype(at::kLong));
  at::Tensor removed = at::zeros({words_per_row}, dets.options().dtype(at::kLong));
  at::Tensor keep = at::empty({n}, dets.options().dtype(at::kBool));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dets.scalar_type(), "nms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mask_kernel<scalar_t><<<roi_cuda::capped_blocks(words_per_row * words_per_row * kBoxesPerWord, kBoxesPerWord),
                            kBoxesPerWord, 0, stream>>>(
        sorted.data_ptr<scalar_t>(), sorted_categories.defined() ? sorted_categories.data_ptr<int64_t>() : nullptr,
        n, words_per_row, acc_t(iou_threshold), int(offset), reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  reduce_kernel<<<1, kReduceThreads, 0, stream>>>(
      reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>()), n, words_per_row,
      reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()), keep.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return order.masked_select(keep);
}

at::Tensor nms_cuda(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold, int64_t offset) {
  roi::check_nms_inputs(dets, scores, offset);
  return nms_kernel(dets, scores, at::Tensor(), iou_threshold, offset);
}

at::Tensor batched_nms_cuda(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold, int64_t offset) {
  roi::check_nms_inputs(dets, scores, offset);
  roi::check_nms_categories(idxs, dets);
  c10::cuda::CUDAGuard guard(dets.device());
  return roi::batched_nms_in_groups(dets, scores, idxs, iou_threshold, offset, kMaxMaskBoxes, &nms_kernel);
}

at::Tensor batched_nms_in_groups_cuda(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& idxs,
                                      double iou_threshold, int64_t offset, int64_t max_group_boxes) {
  roi::check_nms_inputs(dets, scores, offset);
  roi::check_nms_categories(idxs, dets);
  c10::cuda::CUDAGuard guard(dets.device());
  return roi::batched_nms_in_groups(dets, scores, idxs, iou_threshold, offset, max_group_boxes, &nms_kernel);
}

}  // namespace
}  // namespace normkit

TORCH_LIBRARY_IMPL(normkit, CUDA, m) {
  m.impl("nms", &normkit::nms_cuda);
  m.impl("batched_nms", &normkit::batched_nms_cuda);
  m.impl("_batched_nms_in_groups", &normkit::batched_nms_in_groups_cuda);
}
