// Machinery of the HT GPU tests (ht_test.cu, reliability_*_test.cu, masking_test.cu, internode_test.cu):
// every rank builds every rank's inputs from a seed shared by the run, runs the CPU oracle for the whole
// group and checks its own outputs of one notify + dispatch (+ cached dispatch) + combine round: dispatch
// bitwise (it is a copy), combine within a float tolerance and, where the kernels sum in the oracle's order
// (combine_bitwise), bitwise too; each check reports the first value off.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "device_array.hpp"
#include "expertlink/buffer.hpp"
#include "expertlink/reference.hpp"
#include "expertlink/workload.hpp"
#include "harness.hpp"

namespace expertlink::test::htt {

namespace ref = expertlink::reference;
using workload::Routing;

enum class Fmt { kBf16, kFp8, kFp8Ue8m0 };

struct HtCase {
  const char* name;
  int tokens;  // per rank (rank 1 may get zero_tokens_rank)
  int hidden, topk, experts;
  Fmt fmt = Fmt::kBf16;
  bool idx_i32 = false;
  Routing routing = Routing::kUniform;
  int masked_slots = 0;
  int expert_alignment = 1;
  Sizing sizing = Sizing::kExact;
  int zero_tokens_rank = -1;  // this rank has no tokens
  int dead_rank = -1;         // masked (Buffer::mask_rank): the oracle runs without its tokens and picks
  bool with_bias = true;
  int num_sms = 0;
  // Token counts differ across ranks: rank r has tokens + (r % uneven_period) * uneven_step.
  int uneven_period = 2, uneven_step = 3;
  // The kernels sum combine in the oracle's order (intranode; internode with one GPU per node). Off: only
  // within the tolerance (internode with several GPUs per node sums in another order).
  bool combine_bitwise = true;
  // recv_x is the Buffer's receive region (Buffer::ht_window_recv_x: direct dispatch); the Buffer needs
  // ht_recv_bytes for it.
  bool direct = false;
  // combine's x is the receive region too (direct combine: the sources read the rows from the holders,
  // and the top-k weights from the holders' staged copies). The round ends with a barrier (the next round's
  // poison of the region must not land while a peer still reads it).
  bool direct_combine = false;
  // combine gets the received top-k weights and returns their sums per token (combined_topk_weights).
  bool combine_weights = true;
  // The dispatch receives the top-k weights into the window (Buffer::ht_window_recv_topk_weights) and
  // the combine, direct, reads them there (no staging copy). Needs direct_combine.
  bool window_weights = false;
};

// What a checked round saw, for the caller's log.
struct RoundStats {
  int64_t tokens = 0;           // T of this rank
  int64_t num_recv = 0;         // N, rows received
  int64_t combine_inexact = 0;  // combined values within the tolerance but not bitwise equal
};

inline DType x_dtype(Fmt f) {
  return f == Fmt::kBf16 ? DType::kBF16 : DType::kFP8E4M3;
}

// First differing element of two equal-length arrays, or -1.
template <typename A, typename B>
int64_t first_diff(const std::vector<A>& got, const std::vector<B>& want, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(A)) != 0) return static_cast<int64_t>(i);
  return -1;
}

// T of `rank` in case `c`: c.tokens + (rank % c.uneven_period) * c.uneven_step (3 more on odd ranks by
// default), none on c.zero_tokens_rank.
int tokens_of(const HtCase& c, int rank);

// One notify + dispatch + (cached dispatch) + combine round, checked. Returns 0 on success.
int run_round(const RankContext& ctx, const HtCase& c, Buffer& buffer, HtHandle& handle, uint64_t seed,
              cudaStream_t stream, bool also_cached, RoundStats* stats = nullptr);

}  // namespace expertlink::test::htt
