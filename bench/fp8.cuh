// FP8 e4m3 quantization as the bench's inputs use it, the per-128-channel cast of the oracle
// (expertlink/reference.hpp, quantize_row_fp8 without round_scale): sf = max(amax, 1e-4) / 448,
// q = e4m3(x / sf) with IEEE division and saturation.
#pragma once

#include <cstdint>

#include <cuda_fp8.h>

namespace expertlink::bench {

inline constexpr float kFp8Max = 448.0f;

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// One warp quantizes 128 consecutive BF16 channels: lane l handles channels 4l..4l+3. `src` and `dst`
// point at the group's first channel (8- and 4-byte aligned); lane 0 writes the scale.
__device__ __forceinline__ void quantize_group128(const uint16_t* src, uint8_t* dst, float* scale_dst,
                                                  int lane) {
  uint2 raw = *reinterpret_cast<const uint2*>(src + 4 * lane);
  float v[4] = {bf16_bits_to_float(static_cast<uint16_t>(raw.x & 0xffffu)),
                bf16_bits_to_float(static_cast<uint16_t>(raw.x >> 16)),
                bf16_bits_to_float(static_cast<uint16_t>(raw.y & 0xffffu)),
                bf16_bits_to_float(static_cast<uint16_t>(raw.y >> 16))};
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  const float sf = __fdiv_rn(fmaxf(amax, 1e-4f), kFp8Max);
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t q = __nv_cvt_float_to_fp8(__fdiv_rn(v[i], sf), __NV_SATFINITE, __NV_E4M3);
    packed |= q << (8 * i);
  }
  *reinterpret_cast<uint32_t*>(dst + 4 * lane) = packed;
  if (lane == 0) *scale_dst = sf;
}

__device__ __forceinline__ float fp8_to_float(uint8_t bits) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(bits), __NV_E4M3);
  return __half2float(__half(h));
}

}  // namespace expertlink::bench
