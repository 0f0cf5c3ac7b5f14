// Host-visible parameters and launchers of the internode HT kernels (internode_kernels.cu). None of them
// waits on another rank: the network and NVLink hops are NCCL's (transport.hpp); these kernels only count,
// plan, pack, unpack and reduce local memory, so none of them can hang.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kernels/ht_kernels.hpp"

namespace expertlink::internode {

inline constexpr int kMaxTargets = 64;  // nodes or local ranks

// Up to 64 record offsets passed by value: [targets + 1].
struct Offsets {
  int64_t v[kMaxTargets + 1];
};

// Error words a kernel leaves for the host (device memory, read after the stream is synchronized).
enum ErrorWord : int {
  kBadExpert = 0,  // 1 when topk_idx held an id outside [-1, E): then [1] token, [2] slot, [3] value
  kListMismatch =
      4,  // 1 when a list held another number of entries than the plan: [5] target, [6] got, [7] expected
  kErrorWords = 8,
};

// Dispatch record layout (bytes), the same at every stage: row data, scales (4-byte words), source token
// (int32), global top-k ids (int32 [K], -1 = none), top-k weights (float [K]); padded to 16 bytes.
struct RecordLayout {
  int64_t row_bytes = 0;
  int scale_cols = 0;
  int topk = 0;  // ids carried (0: none)
  bool weights = false;
  int64_t scale_off = 0, token_off = 0, idx_off = 0, weight_off = 0, bytes = 0;
};
RecordLayout make_record_layout(int64_t row_bytes, int scale_cols, int topk, bool weights);
// Combine record: BF16 row [2H bytes] then float weights [K] (when summed), padded to 16 bytes.
inline int64_t combine_record_bytes(int64_t hidden, int topk) {
  return kernels::align16(2 * hidden + 4 * topk);
}
// The largest record any call of a handle (hidden H, top-k K) uses: sizes the staging buffers.
inline int64_t max_record_bytes(int64_t hidden, int topk) {
  return kernels::align16(2 * hidden + 4 * (hidden / 128 + 1) + 4 + 8 * topk);
}

struct CountParams {
  const void* topk_idx;  // [T, K] or null
  kernels::IdxType idx_type;
  int64_t idx_rs, idx_cs;
  const uint8_t* in_rank;  // [T, R] bool when topk_idx is null
  int64_t in_rank_rs;
  int num_tokens, topk, num_experts, num_ranks, num_nodes, local_size;
  uint64_t* masks;  // out [T]: bit d = token goes to rank d
  int32_t* counts;  // out, zeroed by the launcher: CountLayout block (per rank, per node, per expert)
  int per_rank_at, per_node_at, per_expert_at;
  int32_t* errors;  // [kErrorWords]
};
void launch_count(const CountParams& p, cudaStream_t stream);

// For each target k (one block each): the items i in [0, n) whose mask has a bit in
// [first + k * stride, first + k * stride + width), in order, written to list[off.v[k] ...]; pos[i * targets
// + k] = the item's index within target k's list, -1 if not in it. Checks the counts against `off`.
void launch_lists(const uint64_t* masks, int64_t n, int targets, int first, int stride, int width,
                  const Offsets& off, int32_t* list, int32_t* pos, int32_t* errors, cudaStream_t stream);

// dst[r] = masks[list[r]] for r < n.
void launch_gather_masks(const uint64_t* masks, const int32_t* list, int64_t n, uint64_t* dst,
                         cudaStream_t stream);

struct PackParams {
  RecordLayout rec;
  const int32_t* list;  // [n] source token of record r
  int64_t n;
  kernels::Strided2d x;  // row bytes: x.data + t * row_stride (elements of elem_bytes)
  int elem_bytes;
  kernels::Strided2d scales;  // 4-byte words
  const void* topk_idx;
  kernels::IdxType idx_type;
  int64_t idx_rs, idx_cs;
  kernels::Strided2d weights;
  char* out;  // [n, rec.bytes]
};
void launch_pack(const PackParams& p, cudaStream_t stream);

// dst record r = src record list[r] (whole records of `bytes`).
void launch_forward(const char* src, const int32_t* list, int64_t n, int64_t bytes, char* dst,
                    cudaStream_t stream);

struct UnpackParams {
  RecordLayout rec;
  const char* in;       // stage-2 receive buffer
  Offsets rank_prefix;  // [R + 1]
  Offsets src_record;   // [R]
  int num_ranks, rank, local_experts;
  int64_t rows;  // rows to write (min(received, capacity))
  void* recv_x;
  int64_t recv_x_stride;  // bytes
  void* recv_scales;
  int64_t scales_rs, scales_cs;  // elements (4-byte)
  void* recv_topk_idx;           // [rows, K] contiguous, idx_type
  kernels::IdxType idx_type;
  float* recv_weights;      // [rows, K] contiguous
  int32_t* recv_src_token;  // [rows]
};
void launch_unpack(const UnpackParams& p, cudaStream_t stream);

// Combine, receiver side: expert-output row o (and its weights) into the stage-2 buffer at the record
// where dispatch's row o came from.
struct CombinePackParams {
  Offsets rank_prefix, src_record;
  int num_ranks;
  int64_t rows, hidden;
  int topk;                    // weights carried when > 0
  kernels::Strided2d x;        // BF16
  kernels::Strided2d weights;  // float, optional
  int64_t rec_bytes;
  char* out;
};
void launch_combine_pack(const CombinePackParams& p, cudaStream_t stream);

// out record q = sum over targets k ascending of in record (off.v[k] + pos[q * targets + k]) where pos >= 0,
// in float32 from 0; then + bias0 + bias1 (rows, when given). Writes BF16 rows to `out` (record q at
// out + q * out_stride bytes) and float weights to out_weights (if given: [n, K] at the record's tail when
// out_weights_in_record, else a contiguous [n, K] array).
struct ReduceParams {
  const char* in;
  int64_t in_rec_bytes;
  const int32_t* pos;
  int targets;
  Offsets off;
  int64_t n, hidden;
  int topk;  // weights summed when > 0
  kernels::Strided2d bias0, bias1;
  char* out;
  int64_t out_stride;      // bytes
  float* out_weights;      // [n, K] contiguous, or null: weights go to the record tail (out + 2H)
  bool weights_to_record;  // forwarder: the partial weights travel in the record
};
void launch_reduce(const ReduceParams& p, cudaStream_t stream);

}  // namespace expertlink::internode
