// Parameters and launchers of the internode LL kernels (ll_internode_kernels.cu). Layout of the staging
// they fill and read: ll_layout.hpp. None of them waits on another rank or touches peer memory: the
// exchange between their launches is NCCL's (grouped ncclSend/ncclRecv on the stream), so none can hang.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "internode/ll_layout.hpp"
#include "kernels/ht_kernels.hpp"  // IdxType
#include "kernels/ll_kernels.hpp"  // LlRecvOutputs

namespace expertlink::internode {

// One call's area in the send buffer (pairs this rank sends to each peer) and in the receive buffer
// (pairs each peer sent here). This rank's own pair is written straight into the receive area.
struct LlAreas {
  char* send;
  char* recv;
};

struct LlIndex {
  const void* data;  // [T, K] top-k ids
  kernels::IdxType type;
  int64_t rs, cs;  // strides, elements
};

// Error words a kernel leaves in host-mapped memory, read by the next LL call: flag (0 none, 1 being
// written, 2 complete), source rank, field (0 hidden, 1 topk, 2 num_experts), value it sent, value here.
inline constexpr int kLlMismatchWords = 5;

// Dispatch, send half 1 (one block per expert e): pos of each token among this rank's tokens that picked
// e, as header words; the per-expert count and the call's shape into the meta block of e's rank.
struct LlRouteParams {
  LlLayout l;
  int rank, num_tokens;
  LlIndex idx;
  LlAreas areas;
  int32_t* words;       // out [T, K]: header word of each valid pick (others left as they are)
  int32_t* bad_expert;  // host-mapped [4] (the LL path's flag): flag, token, slot, value
};
void launch_ll_route(const LlRouteParams& p, cudaStream_t stream);

// Dispatch, send half 2 (one block per token): the row cast once (FP8) and written with its scales into
// the pair of every rank that holds one of its experts; its header into every rank's pair.
struct LlPackParams {
  LlLayout l;
  int rank, num_tokens;
  bool fp8, round_scale, ue8m0;
  const void* x;         // BF16 [T, H]
  int64_t x_row_stride;  // elements
  LlIndex idx;
  const int32_t* words;
  LlAreas areas;
  uint64_t* dst_mask;  // out [T]: ranks holding one of token t's experts (the handle's)
};
void launch_ll_pack(const LlPackParams& p, cudaStream_t stream);

// Dispatch, receive half: every received message expanded into recv_x at its expert-major slot, in the
// order (source rank, source token), as intranode.
struct LlUnpackParams {
  LlLayout l;
  int rank;
  const char* recv;  // this call's receive area
  kernels::LlRecvOutputs out;
  int32_t* tok_slots;   // handle [R, N, K]
  int32_t* src_tokens;  // handle [R]
  int32_t* mismatch;    // host-mapped [kLlMismatchWords]
};
void launch_ll_unpack(const LlUnpackParams& p, int grid, cudaStream_t stream);

// Combine, send half 1 (a thread per token): this rank's weights and combine-time valid bits into the
// weight pair of every rank its token went to.
struct LlWeightsParams {
  LlLayout l;
  int rank, num_tokens;
  LlIndex idx;
  const float* weights;
  int64_t w_rs, w_cs;
  const uint64_t* dst_mask;
  LlAreas areas;
};
void launch_ll_weights(const LlWeightsParams& p, cudaStream_t stream);

// Combine, send half 2 (a warp per (source, token, 2 KB segment)): the holder's weighted sum over the
// token's picks here, in pick order, rounded once to BF16, into the source's partial pair.
struct LlHolderParams {
  LlLayout l;
  int rank;
  const char* x;                 // BF16 [E_local, R*N, H] expert outputs
  int64_t x_stride0, x_stride1;  // bytes
  const int32_t* tok_slots;
  const int32_t* src_tokens;
  LlAreas areas;
};
void launch_ll_holder(const LlHolderParams& p, int grid, cudaStream_t stream);

// Combine, receive half (a warp per (token, segment)): out[t] = the partial rows of the ranks t went to,
// added in rank order in float32 from 0, rounded once.
struct LlSumParams {
  LlLayout l;
  int rank, num_tokens;
  const uint64_t* dst_mask;
  const char* recv;
  void* out;               // BF16 [T, H]
  int64_t out_row_stride;  // elements
};
void launch_ll_sum(const LlSumParams& p, int grid, cudaStream_t stream);

}  // namespace expertlink::internode
