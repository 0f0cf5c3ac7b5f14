#include "nccl_baseline_kernels.hpp"

#include <cuda_bf16.h>
#include <cub/block/block_scan.cuh>

#include "check.hpp"
#include "fp8.cuh"

namespace expertlink::bench {
namespace {

constexpr int kCountThreads = 1024;

// One block. Items are taken 1024 at a time; the per-rank prefix over the items is a block scan of
// 16-bit counters packed four ranks to a 64-bit word (a chunk never exceeds 1024 rows per rank).
__global__ void __launch_bounds__(kCountThreads)
    route_count_kernel(const int64_t* topk_idx, int64_t items, int topk, int experts_per_rank, int num_ranks,
                       bool per_selection, uint32_t* mask_out, int32_t* pos, int32_t* counts,
                       int32_t* displ) {
  using Scan = cub::BlockScan<unsigned long long, kCountThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int running[kBaselineMaxRanks];
  if (threadIdx.x < kBaselineMaxRanks) running[threadIdx.x] = 0;
  __syncthreads();

  for (int64_t base = 0; base < items; base += kCountThreads) {
    const int64_t i = base + threadIdx.x;
    uint32_t mask = 0;
    if (i < items) {
      if (per_selection) {
        int64_t e = topk_idx[i];
        if (e >= 0) mask = 1u << (e / experts_per_rank);
      } else {
        for (int k = 0; k < topk; ++k) {
          int64_t e = topk_idx[i * topk + k];
          if (e >= 0) mask |= 1u << (e / experts_per_rank);
        }
      }
      mask_out[i] = mask;
    }
    for (int g = 0; g < num_ranks; g += 4) {
      unsigned long long flags = 0, prefix = 0, total = 0;
      for (int j = 0; j < 4 && g + j < num_ranks; ++j)
        flags |= static_cast<unsigned long long>(mask >> (g + j) & 1u) << (16 * j);
      Scan(scan_storage).ExclusiveSum(flags, prefix, total);
      if (i < items) {
        for (int j = 0; j < 4 && g + j < num_ranks; ++j) {
          const int r = g + j;
          pos[i * num_ranks + r] =
              (mask >> r & 1u) ? running[r] + static_cast<int32_t>(prefix >> (16 * j) & 0xffffu) : -1;
        }
      }
      __syncthreads();  // everyone has read running[] and scan_storage
      if (threadIdx.x == 0)
        for (int j = 0; j < 4 && g + j < num_ranks; ++j)
          running[g + j] += static_cast<int>(total >> (16 * j) & 0xffffu);
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) {
    int offset = 0;
    for (int r = 0; r < num_ranks; ++r) {
      counts[r] = running[r];
      displ[r] = offset;
      offset += running[r];
    }
  }
}

// Block per token; 16-byte copies into each destination segment.
__global__ void pack_rows_kernel(int num_ranks, const uint32_t* mask, const int32_t* pos,
                                 const int32_t* displ, const uint8_t* seg1, int64_t seg1_bytes,
                                 const uint8_t* seg2, int64_t seg2_bytes, uint8_t* send, int64_t row_bytes) {
  const int64_t t = blockIdx.x;
  uint32_t m = mask[t];
  const uint4* s1 = reinterpret_cast<const uint4*>(seg1 + t * seg1_bytes);
  const uint4* s2 = reinterpret_cast<const uint4*>(seg2 + t * seg2_bytes);
  const int64_t n1 = seg1_bytes / 16, n2 = seg2_bytes / 16;
  while (m != 0) {
    const int r = __ffs(m) - 1;
    m &= m - 1;
    uint4* dst = reinterpret_cast<uint4*>(send + (static_cast<int64_t>(displ[r]) + pos[t * num_ranks + r]) *
                                                     row_bytes);
    for (int64_t v = threadIdx.x; v < n1; v += blockDim.x) dst[v] = s1[v];
    for (int64_t v = threadIdx.x; v < n2; v += blockDim.x) dst[n1 + v] = s2[v];
  }
}

constexpr int kPackWarps = 8;

// Block per selection; warp per 128-channel group.
__global__ void pack_ll_kernel(int topk, int num_ranks, int rank, const int64_t* topk_idx,
                               const uint32_t* mask, const int32_t* pos, const int32_t* displ,
                               const uint16_t* x, int64_t hidden, uint8_t* send, int64_t row_bytes) {
  const int64_t i = blockIdx.x;
  const uint32_t m = mask[i];
  if (m == 0) return;
  const int r = __ffs(m) - 1;
  const int64_t t = i / topk;
  uint8_t* dst = send + (static_cast<int64_t>(displ[r]) + pos[i * num_ranks + r]) * row_bytes;
  float* scales = reinterpret_cast<float*>(dst + hidden);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t g = warp; g < hidden / 128; g += kPackWarps)
    quantize_group128(x + t * hidden + g * 128, dst + g * 128, scales + g, lane);
  if (threadIdx.x == 0) {
    int4 info =
        make_int4(static_cast<int>(t), static_cast<int>(i % topk), static_cast<int>(topk_idx[i]), rank);
    *reinterpret_cast<int4*>(dst + hidden + 4 * (hidden / 128)) = info;
  }
}

// Block per token, 8 channels per thread and step.
__global__ void combine_reduce_kernel(int topk, int num_ranks, bool per_selection, const uint32_t* mask,
                                      const int32_t* pos, const int32_t* displ, const float* topk_weights,
                                      const uint16_t* returned, int64_t hidden, uint16_t* out) {
  const int64_t t = blockIdx.x;
  const int items = per_selection ? topk : 1;
  for (int64_t v = threadIdx.x; v < hidden / 8; v += blockDim.x) {
    float acc[8] = {};
    for (int k = 0; k < items; ++k) {
      const int64_t i = per_selection ? t * topk + k : t;
      const float w = per_selection ? topk_weights[i] : 1.0f;
      uint32_t m = mask[i];
      while (m != 0) {  // HT: ranks ascending; LL: at most one bit
        const int r = __ffs(m) - 1;
        m &= m - 1;
        const int64_t row = static_cast<int64_t>(displ[r]) + pos[i * num_ranks + r];
        uint4 in = reinterpret_cast<const uint4*>(returned + row * hidden)[v];
        uint32_t words[4] = {in.x, in.y, in.z, in.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          acc[2 * q] =
              __fmaf_rn(w, bf16_bits_to_float(static_cast<uint16_t>(words[q] & 0xffffu)), acc[2 * q]);
          acc[2 * q + 1] =
              __fmaf_rn(w, bf16_bits_to_float(static_cast<uint16_t>(words[q] >> 16)), acc[2 * q + 1]);
        }
      }
    }
    uint32_t packed[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      __nv_bfloat162 p = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
      packed[q] = *reinterpret_cast<uint32_t*>(&p);
    }
    reinterpret_cast<uint4*>(out + t * hidden)[v] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

}  // namespace

void launch_route_count(const int64_t* topk_idx, int64_t tokens, int topk, int experts_per_rank,
                        int num_ranks, bool per_selection, uint32_t* mask, int32_t* pos, int32_t* counts,
                        int32_t* displ, cudaStream_t stream) {
  EL_CHECK(num_ranks >= 1 && num_ranks <= kBaselineMaxRanks, "num_ranks = %d: the baseline handles 1 to %d",
           num_ranks, kBaselineMaxRanks);
  const int64_t items = per_selection ? tokens * topk : tokens;
  route_count_kernel<<<1, kCountThreads, 0, stream>>>(topk_idx, items, topk, experts_per_rank, num_ranks,
                                                      per_selection, mask, pos, counts, displ);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_pack_rows(int64_t tokens, int num_ranks, const uint32_t* mask, const int32_t* pos,
                      const int32_t* displ, const uint8_t* seg1, int64_t seg1_bytes, const uint8_t* seg2,
                      int64_t seg2_bytes, uint8_t* send, int64_t row_bytes, cudaStream_t stream) {
  EL_CHECK(seg1_bytes % 16 == 0 && seg2_bytes % 16 == 0 && row_bytes % 16 == 0,
           "row pieces of %lld + %lld bytes in rows of %lld: 16-byte multiples needed",
           static_cast<long long>(seg1_bytes), static_cast<long long>(seg2_bytes),
           static_cast<long long>(row_bytes));
  if (tokens == 0) return;
  pack_rows_kernel<<<static_cast<unsigned>(tokens), 256, 0, stream>>>(
      num_ranks, mask, pos, displ, seg1, seg1_bytes, seg2, seg2_bytes, send, row_bytes);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_pack_ll(int64_t tokens, int topk, int num_ranks, int rank, const int64_t* topk_idx,
                    const uint32_t* mask, const int32_t* pos, const int32_t* displ, const uint16_t* x,
                    int64_t hidden, uint8_t* send, int64_t row_bytes, cudaStream_t stream) {
  EL_CHECK(row_bytes % 16 == 0 && hidden % 512 == 0, "LL rows of %lld bytes, hidden %lld: unaligned",
           static_cast<long long>(row_bytes), static_cast<long long>(hidden));
  if (tokens * topk == 0) return;
  pack_ll_kernel<<<static_cast<unsigned>(tokens * topk), kPackWarps * 32, 0, stream>>>(
      topk, num_ranks, rank, topk_idx, mask, pos, displ, x, hidden, send, row_bytes);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_combine_reduce(int64_t tokens, int topk, int num_ranks, bool per_selection, const uint32_t* mask,
                           const int32_t* pos, const int32_t* displ, const float* topk_weights,
                           const uint16_t* returned, int64_t hidden, uint16_t* out, cudaStream_t stream) {
  if (tokens == 0) return;
  combine_reduce_kernel<<<static_cast<unsigned>(tokens), 128, 0, stream>>>(
      topk, num_ranks, per_selection, mask, pos, displ, topk_weights, returned, hidden, out);
  EL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace expertlink::bench
