// Host-visible parameter blocks, the buffer geometry and the launchers of the low-latency (LL) kernels.
// The protocol and the buffer layout are described in ll_protocol.cuh.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "comm/symmetric_memory.hpp"
#include "expertlink/low_latency.hpp"  // limits
#include "kernels/ht_kernels.hpp"      // IdxType

namespace expertlink::kernels {

inline constexpr int kLlThreads = 512;
inline constexpr int kLlSegmentVecs = 128;             // 16-byte vectors per work unit of a row (2 KB)
inline constexpr int kLlUnroll = kLlSegmentVecs / 32;  // 16-byte vectors per lane per work unit
static_assert(kLlUnroll * 32 == kLlSegmentVecs, "a segment is a whole number of warp-wide vectors");
// Row segments of a BF16 row of kLlMaxHidden channels: the combine flags have one slot per segment.
inline constexpr int kLlMaxSegs = kLlMaxHidden * 2 / 16 / kLlSegmentVecs;
// Tagged meta words of a dispatch source: [0] T, [1] H, [2] K, [3] E, [4..8) unused, [8 + j] count of the
// receiver's local expert j.
inline constexpr int kLlMetaHeader = 8;
inline constexpr int kLlMetaWords = kLlMetaHeader + kLlMaxExperts;

// Device-local (not symmetric) state of the LL protocol, owned by LlState.
struct LlDeviceState {
  uint64_t* seq;        // [8]: use counts per (counter, parity), see LlSeq
  uint32_t* done;       // [kLlDoneCount]: blocks of a running kernel that have finished, see LlDone
  int32_t* host_flags;  // host-mapped [4]: first invalid expert id seen: flag, token, slot, value
};
enum LlSeq : int {
  kLlSeqDispatchSend = 0,
  kLlSeqDispatchRecv = 2,
  kLlSeqCombineSend = 4,
  kLlSeqCombineRecv = 6
};
// Finished-block counters, one per (kernel kind, parity): a send-half kernel and a receive-half (or fused)
// kernel may run at the same time on different streams.
enum LlDone : int {
  kLlDoneDispatchSend = 0,
  kLlDoneDispatchRecv = 2,  // receive half or fused
  kLlDoneCombineSend = 4,
  kLlDoneCombineRecv = 6,  // receive half or fused
  kLlDoneCount = 8,
};
enum LlPhase : int { kLlSend = 1, kLlRecv = 2 };

// One call's layout of the LL region; every rank derives the same from the same arguments. The flag and
// tagged-word arrays sit at the start of an area at offsets that depend only on the number of ranks, so a
// call of another shape never finds row bytes where it expects a flag (ll_protocol.cuh).
struct LlGeometry {
  int num_ranks, capacity, hidden, topk, num_experts, local_experts;
  int64_t region_offset;  // of the LL region within the window's data region
  int64_t area_bytes;     // each of the four areas (dispatch 0/1, combine 0/1)
  // Dispatch area: u64 meta words [R][kLlMetaWords], u64 message flags [R][kLlMaxTokens], then R * N
  // messages [data][scales][header].
  int64_t meta_offset;
  int64_t dflag_offset;
  int64_t msg_offset;  // of the first message
  int64_t msg_bytes;
  int64_t row_bytes;      // data bytes per message: H (FP8) or 2H (BF16)
  int scale_cols;         // FP8: H/128 floats or ceil(H/512) packed words; BF16: 0
  int64_t header_offset;  // within a message: K int32 words
  // Combine area: u64 tagged weights [R][kLlMaxTokens][kLlMaxTopk], u64 partial flags
  // [R][kLlMaxTokens][kLlMaxSegs], then R * N partial rows of 2H bytes.
  int64_t wword_offset;
  int64_t pflag_offset;
  int64_t partial_offset;
  int64_t partial_bytes;

  int64_t dispatch_bytes() const { return msg_offset + int64_t(num_ranks) * capacity * msg_bytes; }
  int64_t combine_bytes() const { return partial_offset + int64_t(num_ranks) * capacity * partial_bytes; }
};

inline int64_t ll_align16(int64_t x) {
  return (x + 15) & ~int64_t(15);
}

// Geometry for a call; area_bytes from the buffer's LL bytes (a quarter each, 16-byte aligned).
inline LlGeometry ll_geometry(int num_ranks, int capacity, int hidden, int topk, int num_experts, bool fp8,
                              bool ue8m0, int64_t region_offset, int64_t ll_bytes) {
  LlGeometry g{};
  g.num_ranks = num_ranks;
  g.capacity = capacity;
  g.hidden = hidden;
  g.topk = topk;
  g.num_experts = num_experts;
  g.local_experts = num_experts / num_ranks;
  g.region_offset = region_offset;
  g.area_bytes = ll_bytes / 4 / 16 * 16;
  g.meta_offset = 0;
  g.dflag_offset = g.meta_offset + 8ll * num_ranks * kLlMetaWords;
  g.msg_offset = ll_align16(g.dflag_offset + 8ll * num_ranks * kLlMaxTokens);
  g.row_bytes = fp8 ? hidden : 2ll * hidden;
  g.scale_cols = fp8 ? (ue8m0 ? (hidden + 511) / 512 : hidden / 128) : 0;
  g.header_offset = g.row_bytes + 4ll * g.scale_cols;
  g.msg_bytes = ll_align16(g.header_offset + 4ll * topk);
  g.wword_offset = 0;
  g.pflag_offset = g.wword_offset + 8ll * num_ranks * kLlMaxTokens * kLlMaxTopk;
  g.partial_offset = ll_align16(g.pflag_offset + 8ll * num_ranks * kLlMaxTokens * kLlMaxSegs);
  g.partial_bytes = 2ll * hidden;
  return g;
}

// Device arrays of an LL handle (src/ll/ll_handle.hpp owns them).
struct LlHandleView {
  int32_t* tok_slots;   // [R, N, K]: receiver side, slot (j * R*N + row) of source (s, t)'s pick k, or -1
  int32_t* src_tokens;  // [R]: T of each source rank
  uint64_t* dst_mask;   // [N]: sender side, ranks holding at least one expert of token t
};

// The received layout's outputs of an LL dispatch (the caller's tensors), written by the receive side
// intranode (ll_dispatch.cu) and across nodes (internode/ll_internode_kernels.cu) alike (ll_expand.cuh).
struct LlRecvOutputs {
  void* recv_x;
  int64_t recv_x_stride0, recv_x_stride1;  // bytes
  void* recv_scales;                       // 4-byte elements
  int64_t scales_stride0, scales_stride1, scales_stride2;
  int32_t* recv_count;
  int32_t* src_info;  // optional
  int64_t src_info_stride0, src_info_stride1;
  void* layout_range;  // optional
  bool range_packed;   // I64 DeepEP packing, else I32 (begin, count)
  int64_t range_stride0, range_stride1, range_stride2;
};

struct LlDispatchParams {
  SymmetricView win;
  LlDeviceState st;
  LlGeometry g;
  LlHandleView handle;
  int parity, phases;  // LlPhase bits
  int num_tokens;
  bool fp8, round_scale, ue8m0;
  const void* x;         // BF16 [T, H]
  int64_t x_row_stride;  // elements
  const void* topk_idx;
  IdxType idx_type;
  int64_t idx_row_stride, idx_col_stride;
  LlRecvOutputs out;
  uint64_t* trace;  // null, or [grid * kLlWarps * kLlTracePoints] phase stamps (EXPERTLINK_LL_TRACE)
};

struct LlCombineParams {
  SymmetricView win;
  LlDeviceState st;
  LlGeometry g;
  LlHandleView handle;
  int parity, phases;
  int num_tokens;
  const void* x;                 // BF16 [E_local, R*N, H]
  int64_t x_stride0, x_stride1;  // bytes
  const void* topk_idx;
  IdxType idx_type;
  int64_t idx_row_stride, idx_col_stride;
  const float* topk_weights;
  int64_t w_row_stride, w_col_stride;
  void* out;               // BF16 [T, H]
  int64_t out_row_stride;  // elements
  uint64_t* trace;         // as LlDispatchParams::trace
};

// EXPERTLINK_LL_TRACE=N (diagnostics only, in a build configured with -DEXPERTLINK_LL_TRACE=ON;
// docs/ll_performance.md): every warp's lane 0 stamps the GPU
// clock at the phases below; the launch of the next call of the same kind reads the previous call's stamps
// and, every N calls, prints per phase the earliest, median and latest warp (us after the earliest stamp).
// Points a warp does not reach stay 0 and are left out. Not while a stream captures a graph.
inline constexpr int kLlTracePoints = 12;
enum LlDispatchPoint : int {
  kDispSendBegin = 0,
  kDispSendLoaded = 1,   // x row, picks, counts, free signals: the send loop may start
  kDispSendStored = 2,   // rows, scales and headers of the block's tokens stored
  kDispSendFenced = 3,   // the releasing warp: its fence done and flags stored; the other warps: at once
  kDispSendFlagged = 4,  // message flags released
  kDispRecvBegin = 5,
  kDispRecvMeta = 6,      // every source's meta words in, prefixes built
  kDispRecvExpanded = 7,  // this warp's work units expanded
  kDispRecvEnd = 8,       // the block's barrier after the expansion
  kDispEnd = 9,           // finished-block counter, free signal, use counts
  kDispSendCast = 10,     // this warp's share of the last token's row cast and stored (the per-warp skew)
  kDispRecvFlag = 11      // the flag of this warp's last work unit acquired (expanded - flag: its expansion)
};
enum LlCombinePoint : int {
  kCombSendBegin = 0,
  kCombSendWeights = 1,  // this warp's tokens' weights pushed
  kCombSendUnits = 2,    // this warp's holder units summed and stored
  kCombSendFlushed = 3,  // its last flags released
  kCombRecvBegin = 4,
  kCombRecvSummed = 5,  // this warp's output segments written
  kCombEnd = 6,
  kCombSendWeightsIn = 7,  // the weights of this warp's last holder unit arrived
  kCombRecvFlag = 8        // the flags of this warp's last receive unit acquired (summed - flag: its sum)
};
enum class LlTraceKind { kDispatch, kCombine };
// Host: the trace array for a launch of `kind` with `phases` (LlPhase bits) on `grid` blocks, or null
// (tracing off, or `stream` capturing). Clears it on the stream when the launch starts a call (send phase).
uint64_t* ll_trace_arm(LlTraceKind kind, int grid, int phases, cudaStream_t stream);

// Occupancy of the kernels (blocks of kLlThreads per SM); the launches are cooperative with one block
// per SM, so every block is resident at once (a fused kernel's receiving warps wait for messages that
// other blocks of the same grid send).
int ll_dispatch_blocks_per_sm();
int ll_combine_blocks_per_sm();
void launch_ll_dispatch(const LlDispatchParams& p, int grid, cudaStream_t stream);
void launch_ll_combine(const LlCombineParams& p, int grid, cudaStream_t stream);

}  // namespace expertlink::kernels
