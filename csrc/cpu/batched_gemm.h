// Batched GEMM for the CPU kernels: out[b] = alpha * a[b]·m[b] (+ addend[b]), one single-threaded GEMM per
// (sample, output tile), the tasks spread over the intra-op threads.
//
// Why not at::bmm: MKL's batched GEMM splits every sample's GEMM across the threads. With B=2 samples of
// 59x512x4096 on two threads that ran 1.4x slower than one sample per thread, which is how oneDNN runs the official
// grouped conv. And on CPUs where MKL does not take its fast path (AMD EPYC here) oneDNN's brgemm micro-kernel, which
// ATen exposes as at::native::cpublas::brgemm, is 1.25-1.45x faster than MKL's sgemm on these shapes. So float32 tiles
// are blocked for the caches and run on brgemm (which itself falls back to BLAS where oneDNN's kernel is missing),
// up to a quota of problem shapes (see kMaxBrgemmProblems); the other dtypes call at::addmm_out per tile.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/native/CPUBlas.h>

// torch's x86-64 builds ship FBGEMM, whose SIMD transpose packs the transposed operands.
#if defined(__has_include) && (defined(__x86_64__) || defined(_M_X64))
#if __has_include(<fbgemm/Utils.h>)
#include <fbgemm/Utils.h>
#define NORMKIT_HAS_FBGEMM 1
#endif
#endif
#ifndef NORMKIT_HAS_FBGEMM
#define NORMKIT_HAS_FBGEMM 0
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <set>
#include <vector>

namespace normkit {
namespace cpu {

// Smallest output tile edge worth a task of its own.
constexpr int64_t kMinGemmTile = 128;

#ifdef CPUBLAS_BRGEMM_F32F32F32
// Cache blocks of the brgemm path: a (kGemmBlockK x kGemmBlockN) block of m stays in L2 while the row blocks of a
// stream past it; the out blocks of one column strip are revisited once per reduction block.
constexpr int64_t kGemmBlockM = 256, kGemmBlockN = 256, kGemmBlockK = 256;

// A rows x cols block at src (element strides s0, s1) as a row-major array: src itself when its rows are unit-stride,
// else a copy in buffer. The copy walks src along its unit stride.
inline const float* row_major_block(const float* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols,
                                    std::vector<float>& buffer, int64_t* ld) {
  if (s1 == 1 && (rows == 1 || s0 >= cols)) {
    *ld = rows == 1 ? cols : s0;
    return src;
  }
  buffer.resize(rows * cols);
  float* dst = buffer.data();
  if (s0 == 1 && s1 >= rows) {  // a transpose: src is the cols x rows array with leading dimension s1
#if NORMKIT_HAS_FBGEMM
    fbgemm::transpose_simd<float>(cols, rows, src, s1, dst, cols);
#else
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = 0; r < rows; ++r) dst[r * cols + c] = src[r + c * s1];
    }
#endif
  } else {  // any other layout, broadcast (zero-stride) views included
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = src[r * s0 + c * s1];
    }
  }
  *ld = cols;
  return dst;
}

// The addend's rows x cols block at src (strides s0, s1) copied into c (leading dimension ldc).
inline void fill_block(float* c, int64_t ldc, const float* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = c + r * ldc;
    const float* src_row = src + r * s0;
    if (s1 == 0) {
      std::fill_n(row, cols, *src_row);
    } else if (s1 == 1) {
      std::memcpy(row, src_row, cols * sizeof(float));
    } else {
      for (int64_t j = 0; j < cols; ++j) row[j] = src_row[j * s1];
    }
  }
}

// out (M x N, unit column stride) = alpha * a (M x K) · m (K x N) (+ addend, any strides, only with alpha = 1),
// on this thread. The addend is written into each out block before its first brgemm call, which then accumulates;
// alpha scales a block after its last one, while the block is still in cache.
inline void brgemm_tile(const at::Tensor& out, const at::Tensor& addend, const at::Tensor& a, const at::Tensor& m,
                        float alpha) {
  const int64_t rows = out.size(0), cols = out.size(1), depth = a.size(1);
  float* c = out.data_ptr<float>();
  const int64_t ldc = out.stride(0);
  const float* m_data = m.const_data_ptr<float>();
  // a is read once per column block: a transposed a is copied to rows once, m block by block.
  std::vector<float> a_buffer, m_buffer;
  int64_t lda = 0;
  const float* a_rows = row_major_block(a.const_data_ptr<float>(), a.stride(0), a.stride(1), rows, depth, a_buffer,
                                        &lda);
  for (int64_t n0 = 0; n0 < cols; n0 += kGemmBlockN) {
    const int64_t nb = std::min(kGemmBlockN, cols - n0);
    if (depth == 0) {  // an empty reduction: out is the addend or zero
      if (addend.defined()) {
        fill_block(c + n0, ldc, addend.const_data_ptr<float>() + n0 * addend.stride(1), addend.stride(0),
                   addend.stride(1), rows, nb);
      } else {
        for (int64_t r = 0; r < rows; ++r) std::fill_n(c + r * ldc + n0, nb, 0.f);
      }
    }
    for (int64_t k0 = 0; k0 < depth; k0 += kGemmBlockK) {
      const int64_t kb = std::min(kGemmBlockK, depth - k0);
      const bool last_k = k0 + kb == depth;
      int64_t ldm = 0;
      const float* m_block = row_major_block(m_data + k0 * m.stride(0) + n0 * m.stride(1), m.stride(0), m.stride(1),
                                             kb, nb, m_buffer, &ldm);
      for (int64_t m0 = 0; m0 < rows; m0 += kGemmBlockM) {
        const int64_t mb = std::min(kGemmBlockM, rows - m0);
        float* c_block = c + m0 * ldc + n0;
        if (k0 == 0 && addend.defined()) {
          fill_block(c_block, ldc, addend.const_data_ptr<float>() + m0 * addend.stride(0) + n0 * addend.stride(1),
                     addend.stride(0), addend.stride(1), mb, nb);
        }
        const bool accumulate = k0 > 0 || addend.defined();
        at::native::cpublas::brgemm(mb, nb, kb, lda, ldm, ldc, accumulate, a_rows + m0 * lda + k0, m_block, c_block);
        if (last_k && alpha != 1.f) {
          for (int64_t r = 0; r < mb; ++r) {
            for (int64_t j = 0; j < nb; ++j) c_block[r * ldc + j] *= alpha;
          }
        }
      }
    }
  }
}

// ATen keeps every brgemm kernel it generates, keyed by the block sizes and leading dimensions, for the life of each
// thread: whole-image inference over ever-new image sizes would grow that cache without bound (by about 0.8 MB per
// image size for a CondNet head on two threads). So brgemm serves the first kMaxBrgemmProblems distinct problems
// (shape, strides and tiling) of the process, which covers training at fixed crop sizes, and later ones run on BLAS.
// The two round differently in the last bits, so a result would depend on what the process ran before; under
// torch.use_deterministic_algorithms every problem runs on BLAS, and a result depends on its inputs alone.
constexpr size_t kMaxBrgemmProblems = 64;
using GemmProblem = std::array<int64_t, 10>;

inline bool admit_brgemm_problem(const GemmProblem& problem) {
  if (at::globalContext().deterministicAlgorithms() || !at::globalContext().userEnabledMkldnn()) return false;
  static std::mutex mutex;
  static std::set<GemmProblem> admitted;
  const std::lock_guard<std::mutex> lock(mutex);
  if (admitted.count(problem) != 0) return true;
  if (admitted.size() >= kMaxBrgemmProblems) return false;
  admitted.insert(problem);
  return true;
}
#endif

// out (B, M, N) = alpha * a (B, M, K) · m (B, K, N) (+ addend broadcast to out, only with alpha = 1); out is a
// fresh tensor. Returns false, having done nothing, when B x tiles cannot occupy every thread (few samples, a small
// output over a long reduction): the library's batched GEMM, which splits a single GEMM across threads, serves those.
inline bool tiled_batched_gemm(const at::Tensor& out, const at::Tensor& addend, const at::Tensor& a,
                               const at::Tensor& m, double alpha) {
  TORCH_INTERNAL_ASSERT(!addend.defined() || alpha == 1.0, "tiled_batched_gemm scales no addend");
  const int64_t batch = out.size(0), rows = out.size(1), cols = out.size(2);
  if (out.numel() == 0) return true;
  // Cut the larger output dimension into as many tiles as make B x tiles a multiple of the thread count, so every
  // thread gets the same work, each tile keeping at least kMinGemmTile rows or columns.
  const int64_t threads = at::get_num_threads();
  const bool split_rows = rows > cols;
  const int64_t extent = split_rows ? rows : cols;
  int64_t tiles = threads / std::gcd(batch, threads);
  tiles = std::max<int64_t>(1, std::min(tiles, extent / kMinGemmTile));
  const int64_t tile = (extent + tiles - 1) / tiles;
  tiles = (extent + tile - 1) / tile;
  if (batch * tiles < threads) return false;
  const int split_dim = split_rows ? 0 : 1;
  const auto broadcast_addend = addend.defined() ? addend.expand_as(out) : at::Tensor();
#ifdef CPUBLAS_BRGEMM_F32F32F32
  const bool use_brgemm =
      out.scalar_type() == at::kFloat && out.stride(2) == 1 &&
      admit_brgemm_problem({rows, cols, a.size(2), tiles, a.stride(1), a.stride(2), m.stride(1), m.stride(2),
                            out.stride(1), broadcast_addend.defined() ? broadcast_addend.stride(2) : -1});
#endif
  // Worker threads start with default thread-local state; the ATen calls must run below autograd and autocast, as
  // on the caller's thread.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / tiles, start = (task % tiles) * tile;
      const int64_t len = std::min(tile, extent - start);
      at::Tensor out_tile = out[sample].narrow(split_dim, start, len);
      const auto a_tile = split_rows ? a[sample].narrow(0, start, len) : a[sample];
      const auto m_tile = split_rows ? m[sample] : m[sample].narrow(1, start, len);
      const auto addend_tile = broadcast_addend.defined() ? broadcast_addend[sample].narrow(split_dim, start, len)
                                                          : at::Tensor();
#ifdef CPUBLAS_BRGEMM_F32F32F32
      if (use_brgemm) {
        brgemm_tile(out_tile, addend_tile, a_tile, m_tile, static_cast<float>(alpha));
        continue;
      }
#endif
      if (addend_tile.defined()) {
        at::addmm_out(out_tile, addend_tile, a_tile, m_tile, 1, alpha);
      } else {
        at::addmm_out(out_tile, out_tile, a_tile, m_tile, 0, alpha);
      }
    }
  });
  return true;
}

}  // namespace cpu
}  // namespace normkit
