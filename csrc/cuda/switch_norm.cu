// Switchable Normalization, CUDA kernels.
//
// Forward: a statistics pass (per-(n, c) Welford mean/M2), one single-block kernel for the O(N*C) mixture math
// (LN per sample by warps, BN per channel by threads, coefficients per plane), and an elementwise pass
// y = scale * x + shift. Backward: a reduction pass (sum dy, sum dy*x), two single-block coefficient kernels, and
// an elementwise pass dx = c1 * dy + c2 * x + c3. The per-plane arithmetic is common/switch_norm.h, shared with the
// CPU kernels. Accumulation is in at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for fp64). No host syncs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/nc_layout.h"
#include "common/switch_norm.h"
#include "common/switch_norm_host.h"

namespace normkit {
namespace {

using namespace switch_norm;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kCoefThreads = 512;     // single-block O(N*C) kernels
constexpr int kElementThreads = 256;  // elementwise kernels
constexpr int kRowThreads = 16;       // rows per block in channels-last reductions (x 32 channels)

int multiprocessor_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index()));
  return count;
}

template <typename T>
__device__ __forceinline__ T warp_all_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// Reduction accumulators (trivial types so they can live in shared memory)

template <typename acc_t>
struct Welford {
  acc_t count, mean, m2;

  __device__ void push(acc_t x) {
    count += acc_t(1);
    const acc_t d = x - mean;
    mean += d / count;
    m2 += d * (x - mean);
  }
  __device__ void merge(const Welford& o) {
    if (o.count == acc_t(0)) return;
    if (count == acc_t(0)) {
      *this = o;
      return;
    }
    const acc_t n = count + o.count;
    const acc_t d = o.mean - mean;
    mean += d * (o.count / n);
    m2 += o.m2 + d * d * (count * (o.count / n));
    count = n;
  }
  __device__ Welford shfl_down(int offset) const {
    return {__shfl_down_sync(kFullMask, count, offset), __shfl_down_sync(kFullMask, mean, offset),
            __shfl_down_sync(kFullMask, m2, offset)};
  }
  __device__ void store(acc_t* out) const {
    out[0] = mean;
    out[1] = m2;
  }
};

template <typename acc_t>
struct SumPair {
  acc_t a, b;

  __device__ void push(acc_t g, acc_t x) {
    a += g;
    b += g * x;
  }
  __device__ void merge(const SumPair& o) {
    a += o.a;
    b += o.b;
  }
  __device__ SumPair shfl_down(int offset) const {
    return {__shfl_down_sync(kFullMask, a, offset), __shfl_down_sync(kFullMask, b, offset)};
  }
  __device__ void store(acc_t* out) const {
    out[0] = a;
    out[1] = b;
  }
};

template <typename scalar_t, typename acc_t>
struct LoadInput {
  using Acc = Welford<acc_t>;
  const scalar_t* x;
  __device__ void operator()(Acc& acc, int64_t i) const { acc.push(static_cast<acc_t>(x[i])); }
};

template <typename scalar_t, typename acc_t>
struct LoadGradInput {
  using Acc = SumPair<acc_t>;
  const scalar_t* dy;
  const scalar_t* x;
  __device__ void operator()(Acc& acc, int64_t i) const {
    acc.push(static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]));
  }
};

// Reduces `acc` over the (1-D, warp-multiple) block; the result is valid in thread 0.
template <typename Acc>
__device__ Acc block_reduce(Acc acc, Acc* shared) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) acc.merge(acc.shfl_down(offset));
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) shared[warp] = acc;
  __syncthreads();
  const int warps = blockDim.x / kWarpSize;
  acc = lane < warps ? shared[lane] : Acc{};
  if (warp == 0)
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) acc.merge(acc.shfl_down(offset));
  return acc;
}

// Planar layout: one block per (n, c) plane (grid-stride over planes).
template <typename Loader, typename acc_t>
__global__ void planar_reduce_kernel(Loader load, int64_t planes, int64_t L, acc_t* out) {
  using Acc = typename Loader::Acc;
  __shared__ Acc shared[kWarpSize];
  for (int64_t p = blockIdx.x; p < planes; p += gridDim.x) {
    Acc acc{};
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) load(acc, p * L + i);
    acc = block_reduce(acc, shared);
    if (threadIdx.x == 0) acc.store(out + 2 * p);
    __syncthreads();  // `shared` is reused by the next plane
  }
}

// Channels-last layout (N, L, C): block = 32 channels x kRowThreads rows over a slice of the rows of one sample;
// grid = (channel tiles, min(N, 65535), row splits). Writes one partial accumulator per (n, split, c).
template <typename Loader>
__global__ void channels_last_reduce_kernel(Loader load, int64_t N, int64_t L, int64_t C, int64_t rows_per_split,
                                            typename Loader::Acc* partial) {
  using Acc = typename Loader::Acc;
  __shared__ Acc shared[kRowThreads][kWarpSize];
  const int64_t c = int64_t(blockIdx.x) * kWarpSize + threadIdx.x;
  const int64_t split = blockIdx.z;
  const int64_t row_end = std::min(L, (split + 1) * rows_per_split);
  // gridDim.y is capped at 65535: a block takes every gridDim.y-th sample (SwitchNorm1d's (N, C) input has N rows).
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    Acc acc{};
    if (c < C)
      for (int64_t l = split * rows_per_split + threadIdx.y; l < row_end; l += kRowThreads)
        load(acc, (n * L + l) * C + c);
    shared[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      for (int r = 1; r < kRowThreads; ++r) acc.merge(shared[r][threadIdx.x]);
      partial[(n * gridDim.z + split) * C + c] = acc;
    }
    __syncthreads();  // `shared` is rewritten by the next sample
  }
}

template <typename Acc, typename acc_t>
__global__ void merge_splits_kernel(const Acc* partial, int64_t N, int64_t splits, int64_t C, acc_t* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * C; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i % C;
    Acc acc{};
    for (int64_t s = 0; s < splits; ++s) acc.merge(partial[(n * splits + s) * C + c]);
    acc.store(out + 2 * i);
  }
}

// Per-(n, c) reduction of a layout-normalised input into out (N, C, 2).
template <typename Loader, typename acc_t>
void launch_nc_reduce(const Loader& load, const at::Tensor& like, const NCLayout& lay, at::Tensor& out) {
  using Acc = typename Loader::Acc;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  acc_t* out_ptr = out.mutable_data_ptr<acc_t>();
  const int sms = multiprocessor_count(like);
  if (!lay.channels_last) {
    // Enough threads per plane to keep ~8 elements per thread, within [32, 512].
    int threads = kWarpSize;
    while (threads < 512 && threads * 8 < lay.L) threads *= 2;
    const int64_t blocks = std::min<int64_t>(lay.N * lay.C, int64_t(sms) * 64);
    planar_reduce_kernel<<<blocks, threads, 0, stream>>>(load, lay.N * lay.C, lay.L, out_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t tiles = (lay.C + kWarpSize - 1) / kWarpSize;
  // Split the rows so that there are a few blocks per multiprocessor even for small N * C.
  const int64_t max_splits = std::max<int64_t>(1, (lay.L + kRowThreads - 1) / kRowThreads);
  const int64_t wanted = (int64_t(sms) * 4 + tiles * lay.N - 1) / (tiles * lay.N);
  const int64_t splits = std::min<int64_t>(std::min<int64_t>(std::max<int64_t>(wanted, 1), max_splits), 65535);
  const int64_t rows_per_split = (lay.L + splits - 1) / splits;
  at::Tensor partial = at::empty({int64_t(lay.N * splits * lay.C * sizeof(Acc))}, like.options().dtype(at::kByte));
  Acc* partial_ptr = reinterpret_cast<Acc*>(partial.mutable_data_ptr());
  const unsigned sample_blocks = unsigned(std::min<int64_t>(lay.N, 65535));
  channels_last_reduce_kernel<<<dim3(tiles, sample_blocks, splits), dim3(kWarpSize, kRowThreads), 0, stream>>>(
      load, lay.N, lay.L, lay.C, rows_per_split, partial_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t blocks = std::min<int64_t>((lay.N * lay.C + 255) / 256, int64_t(sms) * 8);
  merge_splits_kernel<<<blocks, 256, 0, stream>>>(partial_ptr, lay.N, splits, lay.C, out_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor moments_cuda(const at::Tensor& input) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = plane_stats_like(input);
  const at::Tensor x = to_nc_layout(input);
  const NCLayout lay = nc_layout(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "switch_norm_moments_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_nc_reduce<LoadInput<scalar_t, acc_t>, acc_t>({x.const_data_ptr<scalar_t>()}, x, lay, out);
  });
  return out;
}

at::Tensor grad_moments_cuda(const at::Tensor& grad_output, const at::Tensor& input) {
  check_grad_output(grad_output, input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = plane_stats_like(input);
  const at::Tensor x = to_nc_layout(input);
  const at::Tensor dy = match_nc_layout(grad_output, x);
  const NCLayout lay = nc_layout(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "switch_norm_grad_moments_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_nc_reduce<LoadGradInput<scalar_t, acc_t>, acc_t>(
        {dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>()}, x, lay, out);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Elementwise passes: out = k0 * a + k1 (kCoef 2) or k0 * a + k1 * b + k2 (kCoef 3), k per (n, c).

template <typename scalar_t, typename acc_t, int kCoef, typename index_t>
__global__ void per_plane_affine_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                        const acc_t* __restrict__ coef, scalar_t* __restrict__ out, index_t numel,
                                        index_t L, index_t C, bool channels_last) {
  const index_t stride = index_t(gridDim.x) * blockDim.x;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const index_t p = channels_last ? (i / (L * C)) * C + i % C : i / L;
    const acc_t* k = coef + int64_t(p) * kCoef;  // N * C * 3 may exceed int32 while numel does not
    acc_t v = k[0] * static_cast<acc_t>(a[i]);
    if constexpr (kCoef == 3) {
      v += k[1] * static_cast<acc_t>(b[i]) + k[2];
    } else {
      v += k[1];
    }
    out[i] = static_cast<scalar_t>(v);
  }
}

template <int kCoef>
at::Tensor per_plane_affine_cuda(const at::Tensor& a_in, const at::Tensor* b_in, const at::Tensor& coefficients) {
  const c10::cuda::CUDAGuard guard(a_in.device());
  const PlaneAffineArgs args(a_in, b_in, coefficients, kCoef);
  const at::Tensor &a = args.a, &b = args.b, &coef = args.coefficients;
  const NCLayout& lay = args.layout;
  at::Tensor out = args.out;
  const int64_t numel = a.numel();
  if (numel == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((numel + kElementThreads - 1) / kElementThreads,
                                           int64_t(multiprocessor_count(a)) * 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "switch_norm_affine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = b_in ? b.const_data_ptr<scalar_t>() : nullptr;
    // 32-bit index math is much cheaper on the GPU; the grid-stride loop's last step must not wrap around either.
    if (numel + blocks * kElementThreads <= std::numeric_limits<int32_t>::max()) {
      per_plane_affine_kernel<scalar_t, acc_t, kCoef, int32_t><<<blocks, kElementThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), bp, coef.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
          int32_t(numel), int32_t(lay.L), int32_t(lay.C), lay.channels_last);
    } else {
      per_plane_affine_kernel<scalar_t, acc_t, kCoef, int64_t><<<blocks, kElementThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), bp, coef.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), numel,
          lay.L, lay.C, lay.channels_last);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor affine_cuda(const at::Tensor& input, const at::Tensor& coefficients) {
  return per_plane_affine_cuda<2>(input, nullptr, coefficients);
}

at::Tensor affine_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& coefficients) {
  check_grad_output(grad_output, input);
  const at::Tensor x = to_nc_layout(input);
  return per_plane_affine_cuda<3>(match_nc_layout(grad_output, x), &x, coefficients);
}

// ---------------------------------------------------------------------------------------------------------------
// O(N*C) coefficient steps: one block each.

// LN statistics of every sample, one warp per sample, into the (N, 4) scratch: ln[4n] = mean, ln[4n + 1] = var.
template <typename acc_t>
__device__ void layer_stats_by_warps(const acc_t* mom, int64_t N, int64_t C, const GroupForm<acc_t>& form, acc_t* ln) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t n = threadIdx.x / kWarpSize; n < N; n += blockDim.x / kWarpSize) {
    const acc_t* row = mom + 2 * n * C;
    acc_t s = 0;
    for (int64_t c = lane; c < C; c += kWarpSize) s += row[2 * c];
    const acc_t mean = warp_all_sum(s) / acc_t(C);
    acc_t v = 0;
    for (int64_t c = lane; c < C; c += kWarpSize) v += form.member_term(row[2 * c], row[2 * c + 1], mean);
    v = warp_all_sum(v);
    if (lane == 0) {
      ln[4 * n] = mean;
      ln[4 * n + 1] = v / form.denominator(acc_t(C));
    }
  }
}

template <typename acc_t>
struct CoefArgs {
  const acc_t* mom;
  const acc_t* gamma;
  const acc_t* beta;
  const acc_t* mean_logits;
  const acc_t* var_logits;
  int K;
  int64_t N, C, L;
  bool has_instance;
  acc_t eps;
  acc_t* ln;  // scratch (N, 4): LN mean, var, grad mean, grad var
};

template <typename acc_t>
__global__ void forward_coefficients_kernel(CoefArgs<acc_t> args, bool bn_given, acc_t* bn, acc_t* coef) {
  const GroupForm<acc_t> form(args.has_instance, args.L);
  const Mixture<acc_t> mix(args.mean_logits, args.var_logits, args.K, args.has_instance);
  const int64_t N = args.N, C = args.C;
  layer_stats_by_warps(args.mom, N, C, form, args.ln);
  if (mix.has_bn() && !bn_given) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      acc_t s = 0;
      for (int64_t n = 0; n < N; ++n) s += args.mom[2 * (n * C + c)];
      const acc_t mean = s / acc_t(N);
      acc_t v = 0;
      for (int64_t n = 0; n < N; ++n) {
        v += form.member_term(args.mom[2 * (n * C + c)], args.mom[2 * (n * C + c) + 1], mean);
      }
      bn[c] = mean;
      bn[C + c] = v / form.denominator(acc_t(N));
      bn[2 * C + c] = acc_t(N);
    }
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < N * C; p += blockDim.x) {
    const int64_t n = p / C, c = p % C;
    const Normalizer<acc_t> nz(mix, form, args.mom[2 * p], args.mom[2 * p + 1], args.ln[4 * n], args.ln[4 * n + 1],
                               bn[c], bn[C + c], args.eps);
    plane_coefficients(nz, args.gamma[c], args.beta[c], coef + 2 * p);
  }
}

template <typename acc_t>
__device__ PlaneGrad<acc_t> plane_grad(const CoefArgs<acc_t>& args, const Mixture<acc_t>& mix,
                                       const GroupForm<acc_t>& form, const acc_t* bn, const acc_t* gm, int64_t n,
                                       int64_t c, acc_t& rstd) {
  const int64_t p = n * args.C + c;
  const Normalizer<acc_t> nz(mix, form, args.mom[2 * p], args.mom[2 * p + 1], args.ln[4 * n], args.ln[4 * n + 1],
                             bn[c], bn[args.C + c], args.eps);
  rstd = nz.rstd;
  return PlaneGrad<acc_t>(nz, args.gamma[c], gm[2 * p], gm[2 * p + 1]);
}

// LN statistics and LN gradient sums per sample (one warp per sample), into the (N, 4) scratch.
template <typename acc_t>
__device__ void layer_stats_and_grads_by_warps(const CoefArgs<acc_t>& args, const Mixture<acc_t>& mix,
                                               const GroupForm<acc_t>& form, const acc_t* bn, const acc_t* gm) {
  layer_stats_by_warps(args.mom, args.N, args.C, form, args.ln);
  __syncwarp();  // each warp reads back only the samples it wrote
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t n = threadIdx.x / kWarpSize; n < args.N; n += blockDim.x / kWarpSize) {
    acc_t gmean = 0, gvar = 0, rstd;
    for (int64_t c = lane; c < args.C; c += kWarpSize) {
      const PlaneGrad<acc_t> g = plane_grad(args, mix, form, bn, gm, n, c, rstd);
      gmean += g.grad_mean;
      gvar += g.grad_var;
    }
    gmean = warp_all_sum(gmean);
    gvar = warp_all_sum(gvar);
    if (lane == 0) {
      args.ln[4 * n + 2] = gmean;
      args.ln[4 * n + 3] = gvar;
    }
  }
}

template <typename acc_t>
__global__ void backward_reduce_kernel(CoefArgs<acc_t> args, const acc_t* bn, const acc_t* gm, acc_t* grad_weight,
                                       acc_t* grad_bias, acc_t* bn_grad, acc_t* grad_mean_logits,
                                       acc_t* grad_var_logits) {
  const GroupForm<acc_t> form(args.has_instance, args.L);
  const Mixture<acc_t> mix(args.mean_logits, args.var_logits, args.K, args.has_instance);
  const int64_t N = args.N, C = args.C;
  layer_stats_and_grads_by_warps(args, mix, form, bn, gm);
  __syncthreads();
  acc_t d_mean_w[3] = {0, 0, 0}, d_var_w[3] = {0, 0, 0};
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t gw = 0, gb = 0, bgm = 0, bgv = 0, rstd;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t p = n * C + c;
      const PlaneGrad<acc_t> g = plane_grad(args, mix, form, bn, gm, n, c, rstd);
      gw += g.grad_gamma;
      gb += gm[2 * p];
      bgm += g.grad_mean;
      bgv += g.grad_var;
      accumulate_mixture_grads(g, form, args.mom[2 * p], args.mom[2 * p + 1], args.ln[4 * n], args.ln[4 * n + 1],
                               bn[c], bn[C + c], d_mean_w, d_var_w);
    }
    grad_weight[c] = gw;
    grad_bias[c] = gb;
    bn_grad[c] = bgm;
    bn_grad[C + c] = bgv;
  }
  // Block-sum the six mixture accumulators, then the softmax backward in thread 0.
  __shared__ acc_t shared[6][kCoefThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int q = 0; q < 6; ++q) {
    const acc_t v = warp_all_sum(q < 3 ? d_mean_w[q] : d_var_w[q - 3]);
    if (lane == 0) shared[q][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total[6] = {0, 0, 0, 0, 0, 0};
    for (int q = 0; q < 6; ++q)
      for (int w = 0; w < int(blockDim.x / kWarpSize); ++w) total[q] += shared[q][w];
    softmax_backward(mix.mean_w, total, mix.first, args.K, grad_mean_logits);
    softmax_backward(mix.var_w, total + 3, mix.first, args.K, grad_var_logits);
  }
}

template <typename acc_t>
__global__ void backward_coefficients_kernel(CoefArgs<acc_t> args, const acc_t* bn, const acc_t* gm,
                                             const acc_t* bn_grad, acc_t* coef) {
  const GroupForm<acc_t> form(args.has_instance, args.L);
  const Mixture<acc_t> mix(args.mean_logits, args.var_logits, args.K, args.has_instance);
  const int64_t N = args.N, C = args.C;
  const bool with_bn = mix.has_bn() && bn_grad != nullptr;
  layer_stats_and_grads_by_warps(args, mix, form, bn, gm);
  __syncthreads();
  for (int64_t p = threadIdx.x; p < N * C; p += blockDim.x) {
    const int64_t n = p / C, c = p % C;
    acc_t rstd;
    const PlaneGrad<acc_t> g = plane_grad(args, mix, form, bn, gm, n, c, rstd);
    plane_input_grad(mix, form, g, args.gamma[c] * rstd, args.mom[2 * p], acc_t(C), args.ln[4 * n],
                     args.ln[4 * n + 2], args.ln[4 * n + 3], with_bn, with_bn ? bn[2 * C + c] : acc_t(0), bn[c],
                     with_bn ? bn_grad[c] : acc_t(0), with_bn ? bn_grad[C + c] : acc_t(0), coef + 3 * p);
  }
}

template <typename acc_t>
CoefArgs<acc_t> coef_args(const at::Tensor& mom, const Params& params, const at::Tensor& scratch, int64_t count,
                          bool has_instance, double eps) {
  return {mom.const_data_ptr<acc_t>(), params.gamma.const_data_ptr<acc_t>(), params.beta.const_data_ptr<acc_t>(),
          params.mean_logits.const_data_ptr<acc_t>(), params.var_logits.const_data_ptr<acc_t>(), params.K,
          mom.size(0), mom.size(1), count, has_instance, acc_t(eps), scratch.mutable_data_ptr<acc_t>()};
}

std::tuple<at::Tensor, at::Tensor> forward_coefficients_cuda(
    const at::Tensor& moments, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean_weight, const at::Tensor& var_weight, const c10::optional<at::Tensor>& bn_stats,
    int64_t count, bool has_instance, double eps) {
  const c10::cuda::CUDAGuard guard(moments.device());
  ForwardCoefficientArgs args(moments, weight, bias, mean_weight, var_weight, bn_stats, has_instance);
  const at::Tensor& mom = args.moments;
  if (mom.numel() == 0) return {args.coefficients, args.bn_used};
  const at::Tensor scratch = at::empty({mom.size(0), 4}, mom.options());
  AT_DISPATCH_FLOATING_TYPES(mom.scalar_type(), "switch_norm_forward_coefficients_cuda", [&] {
    forward_coefficients_kernel<scalar_t><<<1, kCoefThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        coef_args<scalar_t>(mom, args.params, scratch, count, has_instance, eps), args.bn_given,
        args.bn_used.mutable_data_ptr<scalar_t>(), args.coefficients.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {args.coefficients, args.bn_used};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_reduce_cuda(
    const at::Tensor& grad_moments, const at::Tensor& moments, const at::Tensor& bn_stats,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean_weight, const at::Tensor& var_weight,
    int64_t count, bool has_instance, double eps) {
  const c10::cuda::CUDAGuard guard(moments.device());
  const BackwardArgs args(grad_moments, moments, bn_stats, c10::nullopt, weight, mean_weight, var_weight, has_instance);
  const auto opts = args.moments.options();
  const int64_t N = args.N(), C = args.C();
  at::Tensor grad_weight = at::zeros({C}, opts), grad_bias = at::zeros({C}, opts);
  at::Tensor grad_mean_weight = at::zeros({args.params.K}, opts), grad_var_weight = at::zeros({args.params.K}, opts);
  at::Tensor bn_grad = at::zeros({2, C}, opts);
  if (N * C == 0) return {grad_weight, grad_bias, grad_mean_weight, grad_var_weight, bn_grad};
  const at::Tensor scratch = at::empty({N, 4}, opts);
  AT_DISPATCH_FLOATING_TYPES(args.moments.scalar_type(), "switch_norm_backward_reduce_cuda", [&] {
    backward_reduce_kernel<scalar_t><<<1, kCoefThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        coef_args<scalar_t>(args.moments, args.params, scratch, count, has_instance, eps),
        args.bn_stats.const_data_ptr<scalar_t>(), args.grad_moments.const_data_ptr<scalar_t>(),
        grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(),
        bn_grad.mutable_data_ptr<scalar_t>(), grad_mean_weight.mutable_data_ptr<scalar_t>(),
        grad_var_weight.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_weight, grad_bias, grad_mean_weight, grad_var_weight, bn_grad};
}

at::Tensor backward_coefficients_cuda(const at::Tensor& grad_moments, const at::Tensor& moments,
                                      const at::Tensor& bn_stats, const c10::optional<at::Tensor>& bn_grad,
                                      const c10::optional<at::Tensor>& weight, const at::Tensor& mean_weight,
                                      const at::Tensor& var_weight, int64_t count, bool has_instance, double eps) {
  const c10::cuda::CUDAGuard guard(moments.device());
  const BackwardArgs args(grad_moments, moments, bn_stats, bn_grad, weight, mean_weight, var_weight, has_instance);
  const int64_t N = args.N(), C = args.C();
  at::Tensor coef = at::empty({N, C, 3}, args.moments.options());
  if (N * C == 0) return coef;
  const at::Tensor scratch = at::empty({N, 4}, args.moments.options());
  AT_DISPATCH_FLOATING_TYPES(args.moments.scalar_type(), "switch_norm_backward_coefficients_cuda", [&] {
    backward_coefficients_kernel<scalar_t><<<1, kCoefThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        coef_args<scalar_t>(args.moments, args.params, scratch, count, has_instance, eps),
        args.bn_stats.const_data_ptr<scalar_t>(), args.grad_moments.const_data_ptr<scalar_t>(),
        args.bn_grad.defined() ? args.bn_grad.const_data_ptr<scalar_t>() : nullptr, coef.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return coef;
}

}  // namespace

TORCH_LIBRARY_IMPL(normkit, CUDA, m) {
  m.impl("_switch_norm_moments", &moments_cuda);
  m.impl("_switch_norm_forward_coefficients", &forward_coefficients_cuda);
  m.impl("_switch_norm_affine", &affine_cuda);
  m.impl("_switch_norm_grad_moments", &grad_moments_cuda);
  m.impl("_switch_norm_backward_reduce", &backward_reduce_cuda);
  m.impl("_switch_norm_backward_coefficients", &backward_coefficients_cuda);
  m.impl("_switch_norm_affine_backward", &affine_backward_cuda);
}

}  // namespace normkit
