// The receive side of an LL dispatch, shared by the intranode kernel (ll_dispatch.cu: messages written
// into this rank's window by its peers over NVLink) and the one across nodes
// (internode/ll_internode_kernels.cu: messages received by NCCL into a staging area). A message is one
// (source rank, token) row with its scales and a header word per top-k slot: the local expert j, the
// token's position among that expert's tokens from this source, and a duplicate bit.
#pragma once

#include <cstdint>

#include "kernels/ll_kernels.hpp"

namespace expertlink::kernels {

// begin[j * R + s] holds the number of rows source s sends to local expert j; every thread of the block
// (stride = its size) turns its experts' counts into the first row of each source (sources in rank
// order), and block 0 writes layout_range (when asked for) and recv_count. The caller synchronizes the
// block before and after.
__device__ __forceinline__ void ll_expert_prefix(const LlRecvOutputs& o, int* begin, int EL, int R,
                                                 int stride) {
  for (int j = threadIdx.x; j < EL; j += stride) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      const int c = begin[j * R + s];
      begin[j * R + s] = acc;
      if (blockIdx.x == 0 && o.layout_range != nullptr) {
        if (o.range_packed) {
          static_cast<int64_t*>(o.layout_range)[j * o.range_stride0 + s * o.range_stride1] =
              static_cast<int64_t>(static_cast<uint32_t>(c)) | (static_cast<int64_t>(acc) << 32);
        } else {
          int32_t* r = static_cast<int32_t*>(o.layout_range) + j * o.range_stride0 + s * o.range_stride1;
          r[0] = acc;
          r[o.range_stride2] = c;
        }
      }
      acc += c;
    }
    if (blockIdx.x == 0) o.recv_count[j] = acc;
  }
}

// Where a message lies and what its rows hold.
struct LlMessageShape {
  int64_t row_bytes;      // data bytes: H (FP8) or 2H (BF16)
  int scale_cols;         // 4-byte scale words after the row (0 for BF16)
  int64_t header_offset;  // the K header words
};

// kL2: a peer wrote the message over NVLink, so it is read through L2 only (__ldcg).
template <bool kL2, class T>
__device__ __forceinline__ T ll_load(const T* p) {
  if constexpr (kL2)
    return __ldcg(p);
  else
    return *p;
}

// One warp: segment q (kLlSegmentVecs vectors) of source s's token t's message, expanded into the
// expert-major rows its header names (begin: ll_expert_prefix's first rows). The first segment also
// writes the handle's slots (tok_slots [R, N, K]: j * R * N + row, or -1), src_info and the scales.
template <bool kL2>
__device__ __forceinline__ void ll_expand_unit(const LlRecvOutputs& o, int32_t* tok_slots, const char* msg,
                                               const LlMessageShape& m, const int* begin, int s, int t, int q,
                                               int K, int EL, int R, int N, int lane) {
  const int RN = R * N;
  const int64_t vecs = m.row_bytes / 16;
  // Everything the unit reads from the message is requested at once, before any store (a store between
  // two loads holds the second back until the first returns, since they might alias): the header, the
  // scales (first segment), the segment's row vectors.
  const int32_t h =
      lane < K ? ll_load<kL2>(reinterpret_cast<const int32_t*>(msg + m.header_offset) + lane) : -1;
  uint32_t sc[4] = {};  // scale_cols <= 128
  if (q == 0) {
    const uint32_t* scales = reinterpret_cast<const uint32_t*>(msg + m.row_bytes);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (lane + 32 * i < m.scale_cols) sc[i] = ll_load<kL2>(scales + lane + 32 * i);
  }
  int4 v[kLlUnroll] = {};
  const int64_t first = static_cast<int64_t>(q) * kLlSegmentVecs + lane;
#pragma unroll
  for (int i = 0; i < kLlUnroll; ++i)
    if (first + 32 * i < vecs) v[i] = ll_load<kL2>(reinterpret_cast<const int4*>(msg) + first + 32 * i);
  const int j = h & 0x3FF, pos = (h >> 10) & 0x3FF;
  bool valid = h >= 0 && j < EL;
  const int row = valid ? begin[j * R + s] + pos : 0;
  valid = valid && row < RN;
  const bool copy = valid && ((h >> 30) & 1) == 0;
  const uint32_t cmask = __ballot_sync(~0u, copy);
  if (q == 0) {
    if (lane < K) tok_slots[(static_cast<int64_t>(s) * N + t) * K + lane] = valid ? j * RN + row : -1;
    if (copy && o.src_info != nullptr) o.src_info[j * o.src_info_stride0 + row * o.src_info_stride1] = t;
    if (m.scale_cols > 0 && cmask != 0) {
      for (uint32_t mm = cmask; mm != 0; mm &= mm - 1) {
        const int k = __ffs(mm) - 1;
        const int jj = __shfl_sync(~0u, j, k), rr = __shfl_sync(~0u, row, k);
        uint32_t* dst = static_cast<uint32_t*>(o.recv_scales) + jj * o.scales_stride0 + rr * o.scales_stride1;
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (lane + 32 * i < m.scale_cols) dst[(lane + 32 * i) * o.scales_stride2] = sc[i];
      }
    }
  }
  if (cmask != 0) {
    for (uint32_t mm = cmask; mm != 0; mm &= mm - 1) {
      const int k = __ffs(mm) - 1;
      const int jj = __shfl_sync(~0u, j, k), rr = __shfl_sync(~0u, row, k);
      int4* dst = reinterpret_cast<int4*>(static_cast<char*>(o.recv_x) + jj * o.recv_x_stride0 +
                                          rr * o.recv_x_stride1);
#pragma unroll
      for (int i = 0; i < kLlUnroll; ++i)
        if (first + 32 * i < vecs) dst[first + 32 * i] = v[i];
    }
  }
}

}  // namespace expertlink::kernels
