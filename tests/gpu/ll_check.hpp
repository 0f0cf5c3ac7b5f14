// Machinery of the LL GPU tests (ll_test.cu): every rank builds every rank's inputs from the run seed
// (expertlink/workload.hpp), runs the CPU oracle for the whole group, and checks its own outputs:
// dispatch bitwise (rows, scales, counts, ranges, source tokens; compared per (source rank, token) after
// canonicalize_ll_recv, and the raw order must already be the oracle's), combine within a tolerance of
// 1e-2 of the sum of |weight * expert output| (the kernel rounds per-rank partial sums to BF16).
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include <cuda_runtime.h>

#include "device_array.hpp"
#include "expertlink/buffer.hpp"
#include "expertlink/reference.hpp"
#include "expertlink/workload.hpp"
#include "harness.hpp"

namespace expertlink::test::llt {

namespace ref = expertlink::reference;

struct LlCase {
  const char* name;
  int capacity;  // N = num_max_dispatch_tokens_per_rank
  int hidden, topk, experts;
  bool fp8 = true, round_scale = false, ue8m0 = false;
  bool idx_i32 = false;
  int masked_slots = 10;
  workload::Routing routing = workload::Routing::kUniform;
  bool range_i32 = false;         // layout_range as i32 [E_local, R, 2] instead of DeepEP's packed i64
  bool row_major_scales = false;  // scales [E_local, R*N, G] instead of DeepEP's [E_local, G, R*N]
  bool duplicates = false;        // some tokens name one expert in two slots
};

// The expert output of row `row` (= j * R*N + slot) of rank `rank`, channel h: a hash, the same on the
// host (oracle input) and the device (kernel input), in [-2, 2).
__host__ __device__ inline uint16_t expert_output(uint64_t seed, int rank, int64_t row, int64_t h) {
  uint64_t x = seed ^ (uint64_t(rank) << 56) ^ (uint64_t(row) * 0x9E3779B97F4A7C15ull) ^
               (uint64_t(h) * 0xD1B54A32D192ED03ull);
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  const float v = float(uint32_t(x) & 0xFFFFu) * (4.0f / 65536.0f) - 2.0f;  // exact
  uint32_t bits;
  memcpy(&bits, &v, 4);
  return static_cast<uint16_t>(bits >> 16);  // BF16 by truncation: exact on both sides
}

// Every rank's inputs of one call, and the oracle's dispatch of them.
struct LlRound {
  uint64_t seed = 0;
  std::vector<ref::LlDispatchInput> in;     // per rank
  std::vector<std::vector<float>> weights;  // per rank, [T, K]
  std::vector<ref::LlDispatchOutput> want;  // per rank
  // With a masked rank: the device inputs' top-k ids (picks of the masked rank's experts kept, for the
  // kernels to drop), while `in` holds them as -1 for the oracle. Empty: in[s].topk_idx.
  std::vector<std::vector<int64_t>> device_topk_idx;
};

// `dead_rank` >= 0: that rank is masked (Buffer::mask_rank); give it 0 tokens.
LlRound make_round(const LlCase& c, int num_ranks, uint64_t seed, const std::vector<int>& tokens,
                   int dead_rank = -1);

// One rank's device tensors for the LL calls of a case (inputs sized for N tokens) and the handle.
class LlIo {
 public:
  LlIo(const LlCase& c, int num_ranks, int rank);
  // This rank's inputs of `r` uploaded, outputs poisoned (stream-ordered on `stream`).
  void load(const LlRound& r, cudaStream_t stream);
  // Expert outputs y[row][h] = expert_output(seed, rank, row, h) for every slot, into `dst` (default: own).
  void fill_expert_outputs(uint64_t seed, cudaStream_t stream, uint16_t* dst = nullptr);

  LlDispatchArgs dispatch_args(bool hook) const;
  LlDispatchOutputs dispatch_outputs() const;
  LlCombineArgs combine_args(bool hook, bool zero_copy = false) const;
  LlCombineOutputs combine_outputs() const;

  const LlCase& c;
  const int num_ranks, rank, local_experts;
  const int64_t slots;  // R * N
  int tokens = 0;       // T of the loaded round
  DeviceArray<uint16_t> x;
  DeviceArray<int64_t> idx64;
  DeviceArray<int32_t> idx32;
  DeviceArray<float> weights;
  DeviceArray<uint8_t> recv_x;
  DeviceArray<int32_t> recv_scales, recv_count, src_info, range32;
  DeviceArray<int64_t> range64;
  DeviceArray<uint16_t> y, out;
  LlHandle handle;
};

// Checks this rank's dispatch outputs (after the stream has passed the dispatch). 0 when they match.
int check_dispatch(const RankContext& ctx, const LlIo& io, const LlRound& r);
// Checks this rank's combine output against the oracle's combine of expert outputs made with `y_seed`.
int check_combine(const RankContext& ctx, const LlIo& io, const LlRound& r, uint64_t y_seed);

// Fused dispatch, check, fused combine (expert outputs made with `y_seed`), check. 0 when both match.
int run_fused(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& io, const LlRound& r,
              uint64_t y_seed);

// Split dispatch and combine, one call in flight (each receive hook called right after its send half),
// then both checked as run_fused's. 0 when both match.
int run_split(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& io, const LlRound& r,
              uint64_t y_seed);

// Two split calls in flight: dispatches of a and b (hooks called in call order), then their combines
// (expert outputs made with y_seed_a / y_seed_b) with the receive hooks called in the other order; every
// output checked. 0 when all match.
int run_two_split(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& a, const LlRound& ra,
                  uint64_t y_seed_a, LlIo& b, const LlRound& rb, uint64_t y_seed_b);

// LL calls of every kind on one buffer until at least `min_calls` have run, round after round: fused
// (a1's case), split with one call in flight (b1's), two split calls in flight (a1's and a2's, one case),
// each round's token counts 0..N varying per rank; `between(seed)` runs before every 25th round (e.g. an
// HT round on the same buffer). Every result against the oracle. The number of calls, or -1 on a failure.
int run_mixed_rounds(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& a1, LlIo& a2,
                     LlIo& b1, uint64_t seed0, int min_calls, const std::function<int(uint64_t)>& between);

// Per-rank token counts: all N, or given.
std::vector<int> full_tokens(const LlCase& c, int num_ranks);

// Split calls, `rounds` times on one buffer: two dispatches in flight, a third refused before anything is
// enqueued, a combine along a pending handle refused, a hook called twice refused; the combines' hooks in
// the other order; a split dispatch beside a fused one. Every result against the oracle.
int run_hook_rounds(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, const LlCase& c,
                    uint64_t seed0, int rounds);

// Zero-copy combine, 4 rounds (both parities; fused, then split): expert outputs written straight into
// get_next_ll_combine_buffer (its shape checked). Every result against the oracle.
int run_zero_copy_rounds(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, const LlCase& c,
                         uint64_t seed0);

// Dispatch + combine captured in one CUDA graph, fused then split (hooks), each replayed 5 times with fresh
// inputs; a fused call before (outside capture) and after. Every result against the oracle.
int run_graph_capture_rounds(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, const LlCase& c,
                             uint64_t seed0);

// The LL argument errors refused on every rank before anything is enqueued, intranode and across nodes
// alike: more tokens than N, use_ue8m0 without round_scale, recv_x too small, an empty handle to combine.
// `a` and `o` are valid arguments of io's case (top-2). 0 when each is refused naming its argument.
int expect_common_refusals(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& io,
                           const LlDispatchArgs& a, const LlDispatchOutputs& o);

// Then: a Buffer of `comm` too small for the shape (collective construction) names ll_size_hint, and an
// expert id out of range in every rank's round r is ignored by the kernel and reported by the next call
// (r's ids restored afterwards). 0 when both are refused.
int expect_late_refusals(const RankContext& ctx, Communicator& comm, Buffer& buffer, cudaStream_t stream,
                         LlIo& io, const LlRound& r, const LlDispatchArgs& a, const LlDispatchOutputs& o);

// ll_bytes covering every case.
size_t ll_bytes_for(std::initializer_list<LlCase> cases, int num_ranks);

}  // namespace expertlink::test::llt
