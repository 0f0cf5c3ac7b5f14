// Element and vector access shared by the HT and LL kernels: top-k ids of either index type, the
// non-coherent 16-byte load for inputs that do not change during a kernel, and 8-wide BF16 <-> float32.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/ht_kernels.hpp"  // IdxType

namespace expertlink::kernels {

__device__ __forceinline__ int64_t load_index(const void* p, IdxType type, int64_t offset) {
  return type == IdxType::kI64 ? static_cast<const int64_t*>(p)[offset]
                               : static_cast<const int32_t*>(p)[offset];
}

__device__ __forceinline__ void store_index(void* p, IdxType type, int64_t offset, int64_t v) {
  if (type == IdxType::kI64)
    static_cast<int64_t*>(p)[offset] = v;
  else
    static_cast<int32_t*>(p)[offset] = static_cast<int32_t>(v);
}

__device__ __forceinline__ int4 ld_nc_v4(const void* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// acc[i] += float(v's BF16 element i), i = 0..7.
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], int4 v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

// Eight floats rounded (to nearest even) into eight packed BF16 values.
__device__ __forceinline__ int4 to_bf16x8(const float (&acc)[8]) {
  int4 out;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return out;
}

}  // namespace expertlink::kernels
