// Routing checks shared by the oracle, and the dispatch layout of one rank (DeepEP's get_dispatch_layout).
#include "expertlink/reference.hpp"
#include "reference/checks.hpp"

namespace expertlink::reference {

namespace detail {

void check_experts(int num_experts, int num_ranks) {
  EL_CHECK(num_ranks >= 1, "num_ranks = %d: at least one rank is required", num_ranks);
  EL_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts = %d is outside [1, %d]", num_experts,
           kMaxExperts);
  EL_CHECK(num_experts % num_ranks == 0,
           "num_experts = %d is not a multiple of num_ranks = %d (experts are split evenly)", num_experts,
           num_ranks);
}

void check_topk(int topk) {
  EL_CHECK(topk >= 1 && topk <= kMaxTopk, "topk = %d is outside [1, %d]", topk, kMaxTopk);
}

void check_topk_idx(const std::vector<int64_t>& topk_idx, int64_t num_tokens, int topk, int num_experts,
                    int rank) {
  char prefix[32] = "";
  if (rank >= 0) std::snprintf(prefix, sizeof(prefix), "rank %d: ", rank);
  EL_CHECK(num_tokens >= 0, "%snum_tokens = %lld is negative", prefix, ll(num_tokens));
  EL_CHECK(static_cast<int64_t>(topk_idx.size()) == num_tokens * topk,
           "%stopk_idx has %lld elements, expected num_tokens * topk = %lld * %d = %lld", prefix,
           ll(static_cast<int64_t>(topk_idx.size())), ll(num_tokens), topk, ll(num_tokens * topk));
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int k = 0; k < topk; ++k) {
      const int64_t e = topk_idx[t * topk + k];
      EL_CHECK(e >= -1 && e < num_experts, "%stopk_idx[%lld][%d] = %lld is not an expert: num_experts = %d",
               prefix, ll(t), k, ll(e), num_experts);
    }
  }
}

std::vector<uint8_t> token_in_rank(const std::vector<int64_t>& topk_idx, int64_t num_tokens, int topk,
                                   int num_experts, int num_ranks) {
  const int local = num_experts / num_ranks;
  std::vector<uint8_t> in_rank(static_cast<size_t>(num_tokens * num_ranks), 0);
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int k = 0; k < topk; ++k)
      if (const int64_t e = topk_idx[t * topk + k]; e >= 0) in_rank[t * num_ranks + e / local] = 1;
  return in_rank;
}

}  // namespace detail

DispatchLayout get_dispatch_layout(const std::vector<int64_t>& topk_idx, int64_t num_tokens, int topk,
                                   int num_experts, int num_ranks) {
  detail::check_experts(num_experts, num_ranks);
  detail::check_topk(topk);
  detail::check_topk_idx(topk_idx, num_tokens, topk, num_experts, -1);

  DispatchLayout layout;
  layout.is_token_in_rank = detail::token_in_rank(topk_idx, num_tokens, topk, num_experts, num_ranks);
  layout.num_tokens_per_rank.assign(static_cast<size_t>(num_ranks), 0);
  layout.num_tokens_per_expert.assign(static_cast<size_t>(num_experts), 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int r = 0; r < num_ranks; ++r)
      layout.num_tokens_per_rank[r] += layout.is_token_in_rank[t * num_ranks + r];
    for (int k = 0; k < topk; ++k) {
      const int64_t e = topk_idx[t * topk + k];
      bool first = e >= 0;
      for (int j = 0; j < k && first; ++j) first = topk_idx[t * topk + j] != e;
      if (first) ++layout.num_tokens_per_expert[e];
    }
  }
  return layout;
}

DispatchLayout get_dispatch_layout(const std::vector<int32_t>& topk_idx, int64_t num_tokens, int topk,
                                   int num_experts, int num_ranks) {
  return get_dispatch_layout(widen_topk_idx(topk_idx), num_tokens, topk, num_experts, num_ranks);
}

}  // namespace expertlink::reference
