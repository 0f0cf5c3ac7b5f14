// Kernels of the NCCL baseline: what a user without an EP library writes around ncclSend/ncclRecv.
//
// Layout (one rank): an "item" is a token (HT: sent once to each distinct rank among its experts) or a
// (token, top-k slot) selection (LL: one row per selection). route_count writes, per item, the mask of
// destination ranks and, per (item, rank), the item's row in that rank's segment of the send buffer
// (pos, -1 where not sent); per rank the row count and the segment's first row (displ). Rows keep
// source order inside a segment, so a receiver gets rows by source rank, then source token (then slot).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace expertlink::bench {

inline constexpr int kBaselineMaxRanks = 32;  // masks are 32-bit

void launch_route_count(const int64_t* topk_idx, int64_t tokens, int topk, int experts_per_rank,
                        int num_ranks, bool per_selection, uint32_t* mask, int32_t* pos, int32_t* counts,
                        int32_t* displ, cudaStream_t stream);

// HT: copies each token's row, made of `seg1_bytes` from seg1 + t * seg1_bytes and then `seg2_bytes` from
// seg2 + t * seg2_bytes (FP8: values then scales; BF16: seg2_bytes = 0), into every destination segment.
void launch_pack_rows(int64_t tokens, int num_ranks, const uint32_t* mask, const int32_t* pos,
                      const int32_t* displ, const uint8_t* seg1, int64_t seg1_bytes, const uint8_t* seg2,
                      int64_t seg2_bytes, uint8_t* send, int64_t row_bytes, cudaStream_t stream);

// LL: one row per valid selection: e4m3 [hidden] + float scales [hidden / 128] quantized from x here,
// then source info int32 {token, slot, expert, rank}: hidden + 4 * hidden / 128 + 16 bytes.
void launch_pack_ll(int64_t tokens, int topk, int num_ranks, int rank, const int64_t* topk_idx,
                    const uint32_t* mask, const int32_t* pos, const int32_t* displ, const uint16_t* x,
                    int64_t hidden, uint8_t* send, int64_t row_bytes, cudaStream_t stream);

// out[t] = sum over t's returned BF16 rows (HT: one per destination rank, ranks ascending; LL: one per
// valid selection, slots ascending, times topk_weights) in float32, rounded to BF16 once.
void launch_combine_reduce(int64_t tokens, int topk, int num_ranks, bool per_selection, const uint32_t* mask,
                           const int32_t* pos, const int32_t* displ, const float* topk_weights,
                           const uint16_t* returned, int64_t hidden, uint16_t* out, cudaStream_t stream);

}  // namespace expertlink::bench
