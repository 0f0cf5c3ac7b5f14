// The bench's workloads (shared/WORKLOADS.md) and how they are counted: operation names, row sizes, who
// sends how many rows to whom, the logical and remote bytes of a figure, and the floor. Host-only and
// CUDA-free so that the arithmetic is tested on CI (bench/tests/bench_test.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "expertlink/workload.hpp"

namespace expertlink::bench {

enum class Family { kHt, kLl };

enum class Op {
  kHtDispatchFp8,
  kHtDispatchBf16,
  kHtCombineBf16,
  kLlDispatchFp8,
  kLlCombineBf16,
  kLlRoundtrip,  // LL dispatch then LL combine, timed together
};
inline constexpr Op kAllOps[] = {Op::kHtDispatchFp8, Op::kHtDispatchBf16, Op::kHtCombineBf16,
                                 Op::kLlDispatchFp8, Op::kLlCombineBf16,  Op::kLlRoundtrip};

const char* op_name(Op op);  // the JSON workload name, e.g. "ht_dispatch_fp8"
std::optional<Op> op_from_name(const std::string& name);
Family op_family(Op op);
bool op_has_dispatch(Op op);  // its timed region includes a dispatch whose rows are checked
bool op_has_combine(Op op);   // its timed region includes a combine whose output is checked

const char* routing_label(workload::Routing routing);  // "uniform" / "skewed"

// The WORKLOADS.md shape of a family with `tokens` tokens per rank (the sweep changes only the tokens).
// LL's ~10 masked top-k slots per 128 tokens scale with the token count.
workload::Shape family_shape(Family family, int64_t tokens);
int64_t nominal_tokens(Family family);
std::vector<int64_t> sweep_tokens(Family family);  // HT 256..8192, LL 1..256, powers of two

// Bytes of one row as WORKLOADS.md counts it.
inline int64_t bf16_row_bytes(int64_t hidden) {
  return 2 * hidden;
}
inline int64_t fp8_row_bytes(int64_t hidden) {
  return hidden + 4 * hidden / 128;
}  // e4m3 + float scales
inline int64_t ll_dispatch_row_bytes(int64_t hidden) {
  return fp8_row_bytes(hidden) + 16;
}

// Which (source rank, token, top-k slot) a dispatched row holds. HT rows are per (token, destination
// rank): slot = expert = -1. LL rows are per valid (token, expert) selection.
struct RowId {
  int32_t src_rank;
  int32_t token;
  int32_t slot;
  int32_t expert;
};

// Every rank's routing, as make_topk_idx gives it: topk_all[rank] is [tokens, topk] row-major.
struct Routings {
  int num_ranks = 0;
  int64_t tokens = 0;
  int topk = 0;
  int num_experts = 0;
  std::vector<std::vector<int64_t>> topk_all;
  int experts_per_rank() const { return num_experts / num_ranks; }
};

// Rows of a dispatch: rows[src * num_ranks + dst] = rows rank src sends rank dst (local pairs included).
// HT: tokens of src with at least one expert on dst. LL: valid selections of src whose expert is on dst.
struct Traffic {
  int num_ranks = 0;
  std::vector<int64_t> rows;
  int64_t at(int src, int dst) const { return rows[static_cast<size_t>(src) * num_ranks + dst]; }
  int64_t received(int dst) const;  // local included
  int64_t sent(int src) const;      // local included
  int64_t received_remote(int dst) const;
  int64_t sent_remote(int src) const;
};
Traffic count_traffic(Family family, const Routings& routings);

// The rows rank `dst` receives, in the order every implementation here is checked against: by source
// rank, then by source token, then (LL) by top-k slot. This is the HT order of DESIGN.md; an
// implementation with another layout (LL expert-major) builds its own list from the same routings.
std::vector<RowId> received_rows(Family family, const Routings& routings, int dst);

// LL dispatch's expert-major output on rank `dst` (include/expertlink/low_latency.hpp, the oracle's
// order): for each local expert j, the valid selections whose expert is j's, by source rank, then source
// token, at slots [0, recv_count[j]) of j's R * capacity slots. ids[i] is at row positions[i] of the
// [E_local * R * capacity] rows; range_begin / range_count [E_local, R] are each source rank's block. A
// token that lists an expert twice sends one row (its first slot).
struct LlLayout {
  int64_t slots_per_expert = 0;  // R * capacity
  std::vector<RowId> ids;
  std::vector<int64_t> positions;
  std::vector<int32_t> recv_count;   // [E_local]
  std::vector<int32_t> range_begin;  // [E_local, R]
  std::vector<int32_t> range_count;  // [E_local, R]
};
LlLayout ll_layout(const Routings& routings, int dst, int64_t capacity);

// num_max_dispatch_tokens_per_rank of LL figures at `tokens` tokens per rank: the nominal 128 (a model
// fixes its capacity; fewer tokens use part of it), or the token count where it is larger.
int64_t ll_capacity(int64_t tokens);

// The byte counts of one figure. Per rank r (WORKLOADS.md): HT dispatch and combine count the rows r
// receives in dispatch; LL dispatch and combine count the selections r sends. The figure's `bytes` is
// the largest per-rank count (its time is the slowest rank's); `remote_bytes` is the largest over ranks
// of max(remote bytes received, remote bytes sent) of each phase, summed over the phases of a
// roundtrip. For uniform routing received and sent are about equal; for skewed routing the busiest
// receiver bounds dispatch and the busiest sender bounds combine, so counting both keeps the floor a
// floor.
struct OpBytes {
  int64_t bytes = 0;
  int64_t remote_bytes = 0;
  std::vector<int64_t> per_rank;  // logical bytes of each rank
};
OpBytes op_bytes(Op op, const Traffic& traffic, int64_t hidden);

// GB/s (1e9 bytes per second) of `bytes` moved in `us` microseconds.
double gbps(int64_t bytes, double us);
// Time in microseconds to move `remote_bytes` at `peer_gbps`; nullopt where the peer bandwidth is
// unknown (one GPU, no peer access).
std::optional<double> floor_us(int64_t remote_bytes, std::optional<double> peer_gbps);

double median(std::vector<double> values);

// The expert "computation" the checks use: expert outputs are the dispatched BF16 row times a factor
// that depends on where the row was (HT: the receiving rank; LL: the expert), so that a combine that
// returns a row from the wrong place is seen. Shared by the device fill kernel and the host oracle.
#if defined(__CUDACC__)
#define EL_BENCH_HD __host__ __device__
#else
#define EL_BENCH_HD
#endif
EL_BENCH_HD inline float expert_output_factor(Family family, int dst_rank, int expert) {
  int key = family == Family::kHt ? dst_rank : expert;
  return static_cast<float>(key % 4 + 1);
}

// BF16 bit patterns on the host (round to nearest even, as __float2bfloat16 does for finite values).
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float value);

}  // namespace expertlink::bench
