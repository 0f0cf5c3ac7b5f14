// Host-visible parameter blocks and launchers of the high-throughput (HT) kernels. The protocol and the
// buffer layout are described in ht_protocol.cuh.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "comm/symmetric_memory.hpp"

namespace expertlink::kernels {

// A strided 2-D device array of rows (element stride of rows and columns).
struct Strided2d {
  const void* data = nullptr;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

// Per-buffer device-local state of the HT protocol (not symmetric).
struct HtState {
  // [4]: notify, dispatch, combine rounds completed by this rank; [3] the last combine round that read the
  // peers' receive regions (direct combine), which a direct dispatch waits to be done everywhere.
  uint64_t* rounds;
  uint32_t* done_blocks;  // [3]: blocks of the running kernel that have finished (last one bumps the round)
  // [kHtTicketWords = 3 x 2]: work tickets of the kernels' sending and receiving roles (ht_protocol.cuh,
  // draw_ticket); zero between calls: the last block of a kernel zeroes its pair.
  uint32_t* tickets;
  // [kScanWords]: notify's routing scan (many blocks) hands the notify block its per-expert pick counts
  // ([0, kMaxExpertsTotal)) and the first invalid id ([kScanBad..+3]: flag, token, slot, value); the notify
  // block reads and zeroes them, so they are zero between calls (and graph replays).
  int32_t* scan;
};
inline constexpr int kHtTicketWords = 3 * 2;  // notify, dispatch, combine x sending, receiving
inline constexpr int kScanBad = 1024;         // == kMaxExpertsTotal
inline constexpr int kScanWords = kScanBad + 4;

// Device arrays of an HT handle (src/ht/handle.hpp owns them).
struct HtHandleView {
  int32_t* send_pos;        // [T, R]: position of token t among the rows this rank sends to d, -1 if none
  uint64_t* token_mask;     // [T]: bit d set when token t goes to rank d (notify's scratch)
  int32_t* rank_prefix;     // [R + 1]: first received row of each source rank; [R] = total
  int32_t* dest_row0;       // [R]: first row of this rank's rows at each destination (its rank_prefix[me])
  int32_t* chunk_prefix;    // [R, kMaxChunks + 1]: first row of each source chunk within its source segment
  int32_t* src_tokens;      // [R]: T of each source rank
  int32_t* expert_count;    // [E_local]: received rows per local expert, padded to the alignment
  int32_t* recv_src_token;  // [capacity]: source token of each received row
  int32_t* host_counts;     // host-mapped [kHostHeader + E_local], see HostCount
  int64_t capacity;         // rows the outputs can hold
};

// Host-mapped words of a handle, written by notify, read by the host after a sync.
enum HostCount : int {
  kHostTotal = 0,         // rows this rank receives
  kHostOverCapacity = 1,  // 1 when kHostTotal > capacity (rows past capacity are not written)
  kHostBadExpert = 2,     // 1 when topk_idx held an id outside [-1, E): then [3] token, [4] slot, [5] value
  kHostHeader = 8,        // then per-local-expert counts
};

enum class IdxType : int32_t { kNone, kI32, kI64 };
enum class RowKind : int32_t { kBf16, kFp8, kFp8Ue8m0 };

struct HtNotifyParams {
  SymmetricView win;
  HtState state;
  HtHandleView handle;
  const void* topk_idx;  // [T, K] (IdxType), or null when is_token_in_rank is given
  IdxType idx_type;
  int64_t idx_row_stride, idx_col_stride;
  const uint8_t* is_token_in_rank;  // [T, R] bool, used when topk_idx is null
  int64_t in_rank_row_stride;
  int num_tokens, topk, num_experts, expert_alignment, hidden;
  uint64_t*
      trace;  // null, or [kNotifyTracePoints] GPU clock stamps of the phases (EXPERTLINK_HT_NOTIFY_TRACE)
};
inline constexpr int kNotifyTracePoints = 10;

struct HtDispatchParams {
  SymmetricView win;
  HtState state;
  HtHandleView handle;
  int num_tokens, hidden, topk, num_experts;
  RowKind kind;
  int64_t row_bytes;  // bytes of hidden data per row (BF16: 2H, FP8: H)
  int scale_cols;     // FP8: H/128 floats or ceil(H/512) int32 words; else 0
  Strided2d x, x_scales, topk_weights;
  const void* topk_idx;
  IdxType idx_type;
  int64_t idx_row_stride, idx_col_stride;
  // Outputs (rows up to handle.capacity). Optional ones are null.
  void* recv_x;
  int64_t recv_x_row_stride;  // elements
  void* recv_scales;
  int64_t recv_scales_row_stride, recv_scales_col_stride;
  void* recv_topk_idx;  // same IdxType as topk_idx
  float* recv_topk_weights;
  int32_t* recv_expert_count;  // [E_local], optional copy of handle.expert_count
  int64_t record_bytes;        // bytes per row in the receiving area
  int64_t area_rows;           // rows per source segment of the receiving area
  int64_t area_offset;         // of the dispatch area within the data region
  // Direct dispatch (recv_x is the window's receive region, Buffer::ht_window_recv_x): the region's offset
  // within the data region, -1 otherwise, and the rows it holds (the same on every rank). Senders then
  // write each row straight to its final place at the destination; the receiving halves copy out only the
  // records' small data (scales, top-k, weights, source token).
  int64_t direct_offset = -1;
  int64_t direct_rows = 0;
  uint64_t* trace;  // null, or the phase stamps (EXPERTLINK_HT_TRACE, below)
};

struct HtCombineParams {
  SymmetricView win;
  HtState state;
  HtHandleView handle;
  int num_tokens, hidden, topk;
  Strided2d x;             // BF16 [N_recv, H] expert outputs of the received rows
  Strided2d topk_weights;  // [N_recv, K] float, optional
  Strided2d bias0, bias1;  // BF16 [T, H], optional
  void* out;               // BF16 [T, H]
  int64_t out_row_stride;
  float* out_topk_weights;  // [T, K], optional
  int64_t record_bytes;
  int64_t area_rows;
  int64_t area_offset;  // of the combine area within the data region
  // Direct combine (x is the receive region's view, Buffer::ht_window_recv_x): each source reads its rows
  // from every rank's region (offset within the data region, -1 otherwise; rows it holds).
  int64_t direct_offset = -1;
  int64_t direct_rows = 0;
  uint64_t* trace;  // as HtDispatchParams::trace
};

// EXPERTLINK_HT_TRACE=N (diagnostics only, in a build configured with -DEXPERTLINK_HT_TRACE=ON, which
// compiles the stamps in): per block and per chunk it handles (k-th of the block), the sending half stamps
// the chunk's start, its rows issued (role barrier passed) and its flag released, the receiving half its
// wait, the arrival and the end of its copy (dispatch) or sum (combine). Every N calls the launch of the
// next call of the same kind prints, over the blocks, where the previous call's time went.
inline constexpr int kHtTracePoints = 6;
enum HtTracePoint : int {
  kHtSendStart = 0,
  kHtSendIssued = 1,
  kHtSendPublished = 2,
  kHtRecvWait = 3,
  kHtRecvArrived = 4,
  kHtRecvDone = 5
};
enum class HtTraceKind { kDispatch, kCombine };
// Host: the stamp array for a launch of `grid` blocks, cleared on `stream`, or null (off, or capturing).
uint64_t* ht_trace_arm(HtTraceKind kind, int grid, cudaStream_t stream);

void launch_ht_layout(const void* topk_idx, IdxType idx_type, int64_t idx_row_stride, int64_t idx_col_stride,
                      int num_tokens, int topk, int num_experts, int num_ranks, int32_t* tokens_per_rank,
                      int32_t* tokens_per_expert, uint8_t* is_token_in_rank, cudaStream_t stream);
void launch_ht_notify(const HtNotifyParams& p, cudaStream_t stream);
void launch_ht_dispatch(const HtDispatchParams& p, int num_sms, cudaStream_t stream);
void launch_ht_combine(const HtCombineParams& p, int num_sms, cudaStream_t stream);
// Direct combine with top-k weights: this rank's weights of its `rows` received rows into its window's
// combine area, where the peers read them (before launch_ht_combine, on the same stream).
void launch_ht_stage_weights(const HtCombineParams& p, int64_t rows, cudaStream_t stream);

inline constexpr int kMaxTopkDevice = 32;

__host__ __device__ inline int64_t align16(int64_t x) {
  return (x + 15) & ~int64_t(15);
}

// Records start on 128-byte lines: rows written across NVLink from a 16-byte-aligned stride ran 3-10 %
// slower (el_nvlink_probe, 2x H200, push at 24 SMs: 14336-byte stride 179 us, 14368 185, 14416 192;
// 7168 95, 7472 104); dispatch and combine got 3 % faster with it (2x H100, 2026-11-28).
__host__ __device__ inline int64_t align128(int64_t x) {
  return (x + 127) & ~int64_t(127);
}

// Bytes per row in the receiving areas (layout in ht_protocol.cuh).
__host__ __device__ inline int64_t dispatch_record_bytes(int64_t row_bytes, int scale_cols, int topk) {
  return align128(row_bytes + 4ll * scale_cols + 8ll * topk + 4);
}
__host__ __device__ inline int64_t combine_record_bytes(int hidden, int topk) {
  return align128(2ll * hidden + 4ll * topk);
}

// Chunking of a source rank's tokens: both sides derive it from T alone. Blocks take chunks by ticket
// (ht_protocol.cuh); each costs the sending half a role barrier and a fenced flag. Floors of 32, 48 and 64
// tokens measured on 2x H100 (2026-11-28, T = 4096): against 32, 64 made FP8 dispatch 2-5 % faster, BF16
// dispatch 3 % faster at 8 SMs but 1 % slower at 24, and combine 6 % slower at 24 SMs, so 32 stays.
// EXPERTLINK_HT_MIN_CHUNK (a build option) sets the floor for experiments. A count divisible by common
// SM budgets (96 chunks at T = 4096) did not help (2x H200, 2026-11-28: docs/ht_performance.md).
#ifndef EXPERTLINK_HT_MIN_CHUNK
#define EXPERTLINK_HT_MIN_CHUNK 32
#endif
__host__ __device__ inline int ht_chunk_tokens(int num_tokens) {
  int c = (num_tokens + kMaxChunks - 1) / kMaxChunks;
  return c < EXPERTLINK_HT_MIN_CHUNK ? EXPERTLINK_HT_MIN_CHUNK : c;
}
__host__ __device__ inline int ht_num_chunks(int num_tokens) {
  int c = ht_chunk_tokens(num_tokens);
  return (num_tokens + c - 1) / c;
}

}  // namespace expertlink::kernels
