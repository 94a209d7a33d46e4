// Launch helpers shared by the ROI CUDA kernels: capped grids walked with grid-stride loops.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <cstdint>

namespace normkit {
namespace roi_cuda {

constexpr int kThreads = 256;

// Enough blocks to keep every SM busy several times over; kernels loop over the rest, so huge inputs never
// exceed the grid limit and small ones do not launch idle blocks.
inline unsigned int capped_blocks(int64_t work_items, int threads = kThreads) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t needed = (work_items + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sm_count) * 16)));
}

__device__ inline int64_t global_thread_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ inline int64_t global_thread_count() { return int64_t(gridDim.x) * blockDim.x; }

}  // namespace roi_cuda
}  // namespace normkit
