// LL numerics shared by the intranode kernels and the internode ones (src/internode), so both give the
// oracle's bits: the FP8 cast of dispatch and the weighted add of combine.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace expertlink::kernels {

inline constexpr float kE4m3Max = 448.0f;
inline constexpr float kAmaxFloor = 1e-4f;

// The FP8 cast: 16 BF16 channels per thread, 8 threads per 128-channel group, bit-exact with the
// oracle's cast. One thread's 16 channels cast, and the scale word it may have to write.
struct Fp8Piece {
  int4 data;         // 16 e4m3 bytes
  uint32_t scale;    // a float (per group) or 4 UE8M0 bytes (per 4 groups)
  int scale_index;   // in 4-byte words from the row's scales
  bool write_scale;  // this thread writes `scale`
};

// Whole warps call it (shuffles): `raw` holds channels [16 c, 16 c + 16) of the row (zeros where `valid`
// is false, i.e. past the row). Scales: a float per group from its first lane, or with `ue8m0` 4 bytes per
// word from the warp's lane 0 (a warp covers 4 whole groups; groups past the row give byte 0).
__device__ __forceinline__ Fp8Piece cast_fp8_piece(const int4 (&raw)[2], int c, bool valid, bool round_scale,
                                                   bool ue8m0) {
  const int lane = threadIdx.x & 31;
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(raw);
  float f[16];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 v = __bfloat1622float2(h[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
  amax = fmaxf(amax, __shfl_xor_sync(~0u, amax, 4));
  amax = fmaxf(amax, __shfl_xor_sync(~0u, amax, 2));
  amax = fmaxf(amax, __shfl_xor_sync(~0u, amax, 1));
  amax = fmaxf(amax, kAmaxFloor);
  float sf = __fdiv_rn(amax, kE4m3Max);
  if (round_scale) {
    uint32_t u = __float_as_uint(sf);
    if ((u & 0x7F800000u) != 0x7F800000u && (u & 0x007FFFFFu) != 0) u = (u & 0xFF800000u) + 0x00800000u;
    sf = __uint_as_float(u);
  }
  uint32_t q[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    q[i] = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b)
      q[i] |=
          static_cast<uint32_t>(__nv_cvt_float_to_fp8(__fdiv_rn(f[4 * i + b], sf), __NV_SATFINITE, __NV_E4M3))
          << (8 * b);
  }
  Fp8Piece out;
  out.data = make_int4(static_cast<int>(q[0]), static_cast<int>(q[1]), static_cast<int>(q[2]),
                       static_cast<int>(q[3]));
  out.scale = __float_as_uint(sf);
  out.scale_index = c >> 3;
  out.write_scale = valid && (lane & 7) == 0;
  if (ue8m0) {
    const uint32_t byte = valid ? (__float_as_uint(sf) >> 23) & 0xFFu : 0u;
    out.scale = __shfl_sync(~0u, byte, 0) | (__shfl_sync(~0u, byte, 8) << 8) |
                (__shfl_sync(~0u, byte, 16) << 16) | (__shfl_sync(~0u, byte, 24) << 24);
    out.scale_index = c >> 5;
    out.write_scale = valid && lane == 0;
  }
  return out;
}

// acc += w * v, product rounded to float then added (the oracle's per-term rounding; no FMA).
__device__ __forceinline__ void add_weighted(float (&acc)[8], int4 v, float w) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(w, f.x));
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(w, f.y));
  }
}

}  // namespace expertlink::kernels
