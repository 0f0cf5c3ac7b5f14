// Argument checks shared by the oracle's entry points (internal to src/reference).
#pragma once

#include <cstdint>
#include <vector>

#include "check.hpp"

namespace expertlink::reference::detail {

inline long long ll(int64_t v) {
  return static_cast<long long>(v);
}

// 1 <= num_ranks, 1 <= num_experts <= kMaxExperts, num_experts % num_ranks == 0.
void check_experts(int num_experts, int num_ranks);
// 1 <= topk <= kMaxTopk.
void check_topk(int topk);
// topk_idx is [num_tokens, topk] with ids in [-1, num_experts); `rank` < 0 omits the "rank r: " prefix.
void check_topk_idx(const std::vector<int64_t>& topk_idx, int64_t num_tokens, int topk, int num_experts,
                    int rank);
// Fills is_token_in_rank [T, R] from a validated topk_idx.
std::vector<uint8_t> token_in_rank(const std::vector<int64_t>& topk_idx, int64_t num_tokens, int topk,
                                   int num_experts, int num_ranks);

}  // namespace expertlink::reference::detail
