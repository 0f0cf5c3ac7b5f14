// Machinery of the HT GPU tests (ht_test.cu, reliability_test.cu): every rank builds every rank's inputs
// from a seed shared by the run, runs the CPU oracle for the whole group and checks its own outputs of one
// notify + dispatch (+ cached dispatch) + combine round: dispatch bitwise (it is a copy), combine bitwise
// too (the kernels sum in the oracle's order) after a float-tolerance check that reports the first value off.
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
  int tokens;             // per rank (rank 1 may get zero_tokens_rank)
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
};

inline DType x_dtype(Fmt f) { return f == Fmt::kBf16 ? DType::kBF16 : DType::kFP8E4M3; }

// First differing element of two equal-length arrays, or -1.
template <typename A, typename B>
int64_t first_diff(const std::vector<A>& got, const std::vector<B>& want, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(A)) != 0) return static_cast<int64_t>(i);
  return -1;
}

// T of `rank` in case `c`: c.tokens, 3 more on odd ranks, none on c.zero_tokens_rank.
int tokens_of(const HtCase& c, int rank);

// One notify + dispatch + (cached dispatch) + combine round, checked. Returns 0 on success.
int run_round(const RankContext& ctx, const HtCase& c, Buffer& buffer, HtHandle& handle, uint64_t seed,
              cudaStream_t stream, bool also_cached);

}  // namespace expertlink::test::htt
