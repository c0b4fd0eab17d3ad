// 16-byte vector loads and stores for the elementwise CUDA kernels (pos2d_add, pos2d_add_indexed),
// and the grid size of their grid-stride loops. Device-side and host-side helpers of the .cu files
// only; not part of the installed C++ API.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace jitrope::vector_pack {

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

template <typename scalar_t, int V>
__device__ __forceinline__ Pack<scalar_t, V> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, V>*>(p);
}

template <typename scalar_t, int V>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, V>& v) {
  *reinterpret_cast<Pack<scalar_t, V>*>(p) = v;
}

// Elements per 16-byte pack, or 1 when D, a stride or a pointer is not a multiple of it.
template <typename scalar_t>
int pack_width(int64_t D, std::initializer_list<int64_t> strides, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  bool ok = D % V == 0;
  for (int64_t s : strides) {
    ok = ok && s % V == 0;
  }
  for (const void* p : ptrs) {
    ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  }
  return ok ? V : 1;
}

// Blocks of `threads` for a grid-stride loop over `items`: enough to cover them, at most four
// waves of resident blocks.
inline int64_t grid_blocks(int64_t items, int threads) {
  const int64_t needed = (items + threads - 1) / threads;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t resident = int64_t{props->multiProcessorCount} * (props->maxThreadsPerMultiProcessor / threads) * 4;
  return std::max<int64_t>(1, std::min(needed, resident));
}

}  // namespace jitrope::vector_pack
