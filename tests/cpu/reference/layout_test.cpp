// Dispatch layout of one rank: counts per rank and per expert, is_token_in_rank, argument checks.
#include "test_util.hpp"

namespace expertlink::reference {
namespace {

using testing::throws_with;

TEST(DispatchLayout, HandMadeRoutingGivesExpectedCounts) {
  // 8 experts on 4 ranks (2 each); 4 tokens, top-2.
  const std::vector<int64_t> topk_idx = {
      0,  1,   // token 0: rank 0 twice -> once
      2,  7,   // token 1: ranks 1 and 3
      -1, -1,  // token 2: nowhere
      5,  -1,  // token 3: rank 2
  };
  const DispatchLayout layout = get_dispatch_layout(topk_idx, 4, 2, 8, 4);
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int32_t>{1, 1, 1, 1}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int32_t>{1, 1, 1, 0, 0, 1, 0, 1}));
  EXPECT_TRUE(testing::same_elements(
      layout.is_token_in_rank, std::vector<uint8_t>{1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0}, 4));
}

TEST(DispatchLayout, DuplicateExpertInATokenCountsOnce) {
  const std::vector<int64_t> topk_idx = {3, 3, 1};
  const DispatchLayout layout = get_dispatch_layout(topk_idx, 1, 3, 4, 2);
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int32_t>{0, 1, 0, 1}));
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int32_t>{1, 1}));
}

TEST(DispatchLayout, CountsSumToRoutedPairsForWorkloadRoutingsOnOneToEightRanks) {
  for (int num_ranks : {1, 2, 3, 4, 8}) {
    const int experts = 24 * num_ranks;
    for (auto routing : {workload::Routing::kUniform, workload::Routing::kSkewed}) {
      const auto topk_idx = workload::make_topk_idx(200, 8, experts, num_ranks, routing, 7, 0, 30);
      const DispatchLayout layout = get_dispatch_layout(topk_idx, 200, 8, experts, num_ranks);
      int64_t pairs = 0, selections = 0;
      for (int64_t t = 0; t < 200; ++t) {
        std::vector<bool> seen(static_cast<size_t>(num_ranks), false);
        for (int k = 0; k < 8; ++k) {
          const int64_t e = topk_idx[t * 8 + k];
          if (e < 0) continue;
          ++selections;
          seen[e / (experts / num_ranks)] = true;
        }
        for (int r = 0; r < num_ranks; ++r) {
          pairs += seen[r];
          ASSERT_EQ(layout.is_token_in_rank[t * num_ranks + r], seen[r] ? 1 : 0)
              << "token " << t << " rank " << r;
        }
      }
      int64_t per_rank = 0, per_expert = 0;
      for (int32_t c : layout.num_tokens_per_rank) per_rank += c;
      for (int32_t c : layout.num_tokens_per_expert) per_expert += c;
      EXPECT_EQ(per_rank, pairs) << num_ranks << " ranks, " << workload::routing_name(routing);
      EXPECT_EQ(per_expert, selections) << num_ranks << " ranks, " << workload::routing_name(routing);
    }
  }
}

TEST(DispatchLayout, Int32TopkIdxGivesTheSameLayout) {
  const auto wide = workload::make_topk_idx(50, 3, 16, 4, workload::Routing::kUniform, 1, 2, 5);
  const std::vector<int32_t> narrow(wide.begin(), wide.end());
  const DispatchLayout a = get_dispatch_layout(wide, 50, 3, 16, 4);
  const DispatchLayout b = get_dispatch_layout(narrow, 50, 3, 16, 4);
  EXPECT_EQ(a.num_tokens_per_rank, b.num_tokens_per_rank);
  EXPECT_EQ(a.num_tokens_per_expert, b.num_tokens_per_expert);
  EXPECT_EQ(a.is_token_in_rank, b.is_token_in_rank);
}

TEST(DispatchLayout, ZeroTokensGiveZeroCounts) {
  const DispatchLayout layout = get_dispatch_layout(std::vector<int64_t>{}, 0, 4, 8, 2);
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int32_t>{0, 0}));
  EXPECT_TRUE(layout.is_token_in_rank.empty());
}

TEST(DispatchLayout, ExpertIdOutOfRangeRejectedNamingTheSlot) {
  std::vector<int64_t> topk_idx(18 * 4, 0);
  topk_idx[17 * 4 + 3] = 300;
  EXPECT_TRUE(throws_with([&] { get_dispatch_layout(topk_idx, 18, 4, 256, 8); },
                          {"topk_idx[17][3] = 300 is not an expert: num_experts = 256"}));
  topk_idx[17 * 4 + 3] = -2;
  EXPECT_TRUE(throws_with([&] { get_dispatch_layout(topk_idx, 18, 4, 256, 8); }, {"topk_idx[17][3] = -2"}));
}

TEST(DispatchLayout, BadExpertsTopkAndShapesRejected) {
  const std::vector<int64_t> topk_idx(8, 0);
  EXPECT_TRUE(throws_with([&] { get_dispatch_layout(topk_idx, 4, 2, 10, 3); },
                          {"num_experts = 10 is not a multiple of num_ranks = 3"}));
  EXPECT_TRUE(throws_with([&] { get_dispatch_layout(topk_idx, 4, 2, 2048, 2); }, {"num_experts = 2048"}));
  EXPECT_TRUE(
      throws_with([&] { get_dispatch_layout(std::vector<int64_t>(33, 0), 1, 33, 64, 2); }, {"topk = 33"}));
  EXPECT_TRUE(throws_with([&] { get_dispatch_layout(topk_idx, 4, 0, 8, 2); }, {"topk = 0"}));
  EXPECT_TRUE(throws_with([&] { get_dispatch_layout(topk_idx, 3, 2, 8, 2); },
                          {"topk_idx has 8 elements, expected num_tokens * topk = 3 * 2 = 6"}));
  EXPECT_TRUE(throws_with([&] { get_dispatch_layout(topk_idx, 4, 2, 8, 0); }, {"num_ranks = 0"}));
}

}  // namespace
}  // namespace expertlink::reference
