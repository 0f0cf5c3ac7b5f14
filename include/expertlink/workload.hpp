// The benchmark and test workloads of shared/WORKLOADS.md, in one place: tests, the bench and users' own
// tests draw their inputs from here so that every figure and every check means the same thing.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace expertlink::workload {

enum class Routing {
  kUniform,  // top-k of abs(randn(E)) + 1: uniform random distinct experts
  kSkewed,   // about half of all picks go to the experts of rank 0, the rest uniform
};
const char* routing_name(Routing routing);

struct Shape {
  const char* name;
  int64_t tokens;  // tokens per rank
  int64_t hidden;
  int topk;
  int num_experts;
  int masked_slots;  // top-k slots set to -1 at random per rank (LL: ~10)
};

inline constexpr Shape kHighThroughput{"ht", 4096, 7168, 8, 256, 0};
inline constexpr Shape kLowLatency{"ll", 128, 7168, 8, 288, 10};

// One rank's top-k routing, row-major [tokens, topk]: distinct experts per token, -1 where masked.
// Deterministic in (seed, rank), the same on every platform; different ranks get different routings.
// kSkewed: each slot picks rank 0's experts with probability 1/2 (as far as distinctness allows).
// masked_slots distinct slots (at most tokens * topk) are chosen uniformly and set to -1.
std::vector<int64_t> make_topk_idx(int64_t tokens, int topk, int num_experts, int num_ranks, Routing routing,
                                   uint64_t seed, int rank, int masked_slots = 0);

// Positive weights in [0.25, 1.25), [tokens, topk], 0 where topk_idx is -1.
std::vector<float> make_topk_weights(const std::vector<int64_t>& topk_idx, int topk, uint64_t seed, int rank);

// Random BF16 values (bit patterns) drawn from a normal distribution; never all zero, never constant.
std::vector<uint16_t> make_bf16(size_t count, uint64_t seed, int rank);

}  // namespace expertlink::workload
