// Host-side description of an (N, C, *spatial) tensor as N x C planes of L elements, in one of two dense
// memory layouts: "planar" (NCHW-contiguous: each (n, c) plane is contiguous) or "channels last"
// ((N, *spatial, C)-contiguous: each spatial row holds C channels). Shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace normkit {

struct NCLayout {
  int64_t N;
  int64_t C;
  int64_t L;
  bool channels_last;
};

inline bool is_channels_last_dense(const at::Tensor& x) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < x.dim(); ++d) order.push_back(d);
  order.push_back(1);
  return x.permute(order).is_contiguous();
}

inline int64_t spatial_size(const at::Tensor& x) {
  int64_t L = 1;
  for (int64_t d = 2; d < x.dim(); ++d) L *= x.size(d);
  return L;
}

// Returns x itself when it already has a supported dense layout, else a planar copy. With L == 1 the two
// layouts coincide and the channels-last form (rows of C) is the efficient one.
inline at::Tensor to_nc_layout(const at::Tensor& x) {
  if (is_channels_last_dense(x) || (spatial_size(x) > 1 && x.is_contiguous())) return x;
  return x.contiguous();
}

// Layout of a tensor returned by to_nc_layout. Planar wins when both hold (C == 1), unless L == 1.
inline NCLayout nc_layout(const at::Tensor& x) {
  const int64_t L = spatial_size(x);
  const bool cl = is_channels_last_dense(x) && (L == 1 || !x.is_contiguous());
  return NCLayout{x.size(0), x.size(1), L, cl};
}

// `t` (same shape as `like`) in the same dense layout as `like`.
inline at::Tensor match_nc_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_strided(like.sizes(), like.strides(), t.options()).copy_(t);
}

}  // namespace normkit
