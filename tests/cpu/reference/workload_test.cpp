// Workload generators of shared/WORKLOADS.md: routing properties, determinism, masking, weights, data.
#include <set>

#include "test_util.hpp"

namespace expertlink::workload {
namespace {

using reference::testing::throws_with;

TEST(Workload, ShapesMatchWorkloadsMd) {
  EXPECT_EQ(kHighThroughput.tokens, 4096);
  EXPECT_EQ(kHighThroughput.hidden, 7168);
  EXPECT_EQ(kHighThroughput.topk, 8);
  EXPECT_EQ(kHighThroughput.num_experts, 256);
  EXPECT_EQ(kLowLatency.tokens, 128);
  EXPECT_EQ(kLowLatency.num_experts, 288);
  EXPECT_EQ(kLowLatency.masked_slots, 10);
  EXPECT_STREQ(routing_name(Routing::kUniform), "uniform");
  EXPECT_STREQ(routing_name(Routing::kSkewed), "skewed");
}

TEST(Workload, UniformTopkHasDistinctInRangeExpertsAndCoversAllExperts) {
  const auto idx = make_topk_idx(2000, 8, 64, 4, Routing::kUniform, 1, 0);
  ASSERT_EQ(idx.size(), 2000u * 8);
  std::vector<int> hits(64, 0);
  for (int64_t t = 0; t < 2000; ++t) {
    std::set<int64_t> seen;
    for (int k = 0; k < 8; ++k) {
      const int64_t e = idx[t * 8 + k];
      ASSERT_TRUE(e >= 0 && e < 64) << "topk_idx[" << t << "][" << k << "] = " << e;
      ASSERT_TRUE(seen.insert(e).second) << "token " << t << " repeats expert " << e;
      ++hits[e];
    }
  }
  for (int e = 0; e < 64; ++e) EXPECT_NEAR(hits[e], 250, 80) << "expert " << e;  // 16000 picks / 64
}

TEST(Workload, SkewedSendsAboutHalfOfPicksToRankZerosExperts) {
  const auto idx = make_topk_idx(4096, 8, 256, 8, Routing::kSkewed, 3, 1);
  int64_t to_rank0 = 0;
  for (int64_t t = 0; t < 4096; ++t) {
    std::set<int64_t> seen(idx.begin() + t * 8, idx.begin() + (t + 1) * 8);
    ASSERT_EQ(seen.size(), 8u) << "token " << t << " repeats an expert";
    for (int k = 0; k < 8; ++k) to_rank0 += idx[t * 8 + k] < 32;
  }
  EXPECT_NEAR(static_cast<double>(to_rank0) / (4096 * 8), 0.5, 0.02);
  // Few experts per rank: distinctness caps rank 0's share, and the routing stays valid.
  const auto tight = make_topk_idx(100, 9, 12, 4, Routing::kSkewed, 3, 0);
  for (int64_t t = 0; t < 100; ++t)
    EXPECT_EQ(std::set<int64_t>(tight.begin() + t * 9, tight.begin() + (t + 1) * 9).size(), 9u);
}

TEST(Workload, DeterministicInSeedAndRankAndDifferentAcrossRanksAndSeeds) {
  const auto a = make_topk_idx(128, 8, 288, 8, Routing::kUniform, 42, 3, 10);
  EXPECT_EQ(a, make_topk_idx(128, 8, 288, 8, Routing::kUniform, 42, 3, 10));
  EXPECT_NE(a, make_topk_idx(128, 8, 288, 8, Routing::kUniform, 42, 4, 10));
  EXPECT_NE(a, make_topk_idx(128, 8, 288, 8, Routing::kUniform, 43, 3, 10));
  EXPECT_EQ(make_bf16(1000, 7, 2), make_bf16(1000, 7, 2));
  EXPECT_NE(make_bf16(1000, 7, 2), make_bf16(1000, 7, 1));
  // Pinned values: the generators must not drift between platforms or edits (shared/WORKLOADS.md seeds).
  EXPECT_EQ(make_topk_idx(2, 4, 16, 2, Routing::kUniform, 1, 0),
            (std::vector<int64_t>{1, 10, 7, 14, 6, 8, 0, 7}));
}

TEST(Workload, MaskedSlotsSetExactlyThatManySlotsToMinusOne) {
  for (int masked : {0, 1, 10, 200}) {
    const auto idx = make_topk_idx(128, 8, 288, 4, Routing::kUniform, 9, 0, masked);
    EXPECT_EQ(std::count(idx.begin(), idx.end(), -1), masked) << "masked_slots " << masked;
  }
  const auto all = make_topk_idx(2, 3, 8, 2, Routing::kSkewed, 9, 0, 100);  // capped at tokens * topk
  EXPECT_EQ(std::count(all.begin(), all.end(), -1), 6);
}

TEST(Workload, WeightsPositiveAndZeroWhereMasked) {
  const auto idx = make_topk_idx(300, 8, 64, 4, Routing::kUniform, 5, 1, 50);
  const auto w = make_topk_weights(idx, 8, 5, 1);
  ASSERT_EQ(w.size(), idx.size());
  for (size_t i = 0; i < w.size(); ++i) {
    if (idx[i] < 0)
      EXPECT_EQ(w[i], 0.0f) << "slot " << i;
    else
      EXPECT_TRUE(w[i] >= 0.25f && w[i] < 1.25f) << "slot " << i << " weight " << w[i];
  }
  EXPECT_TRUE(throws_with([&] { make_topk_weights(std::vector<int64_t>(7, 0), 2, 1, 0); }, {"topk = 2"}));
}

TEST(Workload, Bf16DataLooksStandardNormalAndIsNeverConstant) {
  const auto x = make_bf16(100000, 11, 0);
  double sum = 0, sum2 = 0;
  std::set<uint16_t> distinct;
  for (uint16_t b : x) {
    const double v = reference::bf16_to_float(b);
    ASSERT_TRUE(std::isfinite(v));
    sum += v;
    sum2 += v * v;
    distinct.insert(b);
  }
  EXPECT_NEAR(sum / 1e5, 0.0, 0.02);
  EXPECT_NEAR(sum2 / 1e5, 1.0, 0.03);
  EXPECT_GT(distinct.size(), 1000u);
  EXPECT_EQ(make_bf16(3, 1, 0).size(), 3u);
}

TEST(Workload, InvalidArgumentsRejectedWithNamedMessages) {
  EXPECT_TRUE(throws_with([] { make_topk_idx(4, 9, 8, 2, Routing::kUniform, 1, 0); },
                          {"topk = 9 exceeds num_experts = 8"}));
  EXPECT_TRUE(throws_with([] { make_topk_idx(4, 2, 9, 2, Routing::kUniform, 1, 0); }, {"num_experts = 9"}));
  EXPECT_TRUE(throws_with([] { make_topk_idx(-1, 2, 8, 2, Routing::kUniform, 1, 0); }, {"tokens = -1"}));
  EXPECT_TRUE(
      throws_with([] { make_topk_idx(4, 2, 8, 2, Routing::kUniform, 1, 0, -3); }, {"masked_slots = -3"}));
}

}  // namespace
}  // namespace expertlink::workload
