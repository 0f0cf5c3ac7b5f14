// Byte layout of the internode low-latency (LL) path's staging (docs/internode.md, "LL across nodes").
// Pure host arithmetic, shared by the host code, the kernels' parameters and the CPU tests.
//
// The staging is two device buffers of ll_bytes each (not symmetric: NCCL moves the bytes), one for
// what this rank sends and one for what it receives, each split like the intranode LL region into four
// areas of ll_bytes / 4: dispatch parity 0, 1 and combine parity 0, 1. One (source, destination) pair
// owns a fixed-size block of an area (its "pair"), the same size for every pair, so every rank knows every
// message size from the call's arguments alone (no count exchange, no host wait: CUDA-graph capturable).
//
// Dispatch pair (source s -> destination d), at area + peer * dispatch_pair:
//   meta     int32 [4 + E_local], padded to 16 bytes: T_s, H, K, E, then per local expert j of d the
//            number of s's tokens that picked it (a token counts an expert once)
//   messages N slots of msg_bytes; slot t = s's token t (t < T_s are valid):
//            [row: FP8 (H bytes) or BF16 (2H)][scales: H/128 f32 or ceil(H/512) packed UE8M0 words]
//            [header: K int32]. header[k] = -1 when pick k is not on d, else j | pos << 10 | dup << 30
//            (pos = rank of t among s's tokens that picked j; dup = an earlier slot of t names the same
//            expert). Rows and scales are written only into the d that hold one of t's experts.
// Combine pairs, at area + peer * weight_pair, then area + R * weight_pair + peer * partial_pair:
//   weights  (source s -> holder d) f32 [N][K] then u32 [N] (bit k: topk_idx[t][k] >= 0 at combine time)
//   partials (holder d -> source s) BF16 [N][H]: d's weighted sum over t's picks on d, rounded once
// Pairs whose peer is this rank are written by the kernels straight into the receive buffer (no copy
// through NCCL); the other R - 1 are exchanged by one grouped ncclSend/ncclRecv per hop.
#pragma once

#include <cstdint>

namespace expertlink::internode {

struct LlLayout {
  int num_ranks = 0, capacity = 0, hidden = 0, topk = 0, num_experts = 0, local_experts = 0;
  // Dispatch pair.
  int64_t meta_bytes = 0;
  int64_t row_bytes = 0;
  int scale_cols = 0;
  int64_t header_offset = 0;  // within a message
  int64_t msg_bytes = 0;
  int64_t dispatch_pair = 0;
  // Combine pairs.
  int64_t valid_offset = 0;  // of the u32 valid words within a weight pair
  int64_t weight_pair = 0;
  int64_t partial_pair = 0;
  int64_t partial_offset = 0;  // of the partial pairs within a combine area: R * weight_pair

  int64_t dispatch_bytes() const { return int64_t(num_ranks) * dispatch_pair; }
  int64_t combine_bytes() const { return partial_offset + int64_t(num_ranks) * partial_pair; }
};

inline int64_t ll_pad16(int64_t x) {
  return (x + 15) & ~int64_t(15);
}

// Layout of one call (the dispatch's arguments; combine uses the same handle's R, N, H, K, E).
inline LlLayout make_ll_layout(int num_ranks, int capacity, int hidden, int topk, int num_experts, bool fp8,
                               bool ue8m0) {
  LlLayout l;
  l.num_ranks = num_ranks;
  l.capacity = capacity;
  l.hidden = hidden;
  l.topk = topk;
  l.num_experts = num_experts;
  l.local_experts = num_experts / num_ranks;
  l.meta_bytes = ll_pad16(4ll * (4 + l.local_experts));
  l.row_bytes = fp8 ? hidden : 2ll * hidden;
  l.scale_cols = fp8 ? (ue8m0 ? (hidden + 511) / 512 : hidden / 128) : 0;
  l.header_offset = l.row_bytes + 4ll * l.scale_cols;
  l.msg_bytes = ll_pad16(l.header_offset + 4ll * topk);
  l.dispatch_pair = l.meta_bytes + int64_t(capacity) * l.msg_bytes;
  l.valid_offset = ll_pad16(4ll * capacity * topk);
  l.weight_pair = l.valid_offset + ll_pad16(4ll * capacity);
  l.partial_pair = 2ll * capacity * hidden;
  l.partial_offset = int64_t(num_ranks) * l.weight_pair;
  return l;
}

// Bytes of each of the four areas of a staging buffer of `ll_bytes` (16-byte aligned).
inline int64_t ll_area_bytes(int64_t ll_bytes) {
  return ll_bytes / 4 / 16 * 16;
}

}  // namespace expertlink::internode
