// High-throughput dispatch and combine of the oracle, checked against direct recomputation of the
// contract (reference.hpp) and against round-trip properties.
#include <algorithm>

#include "test_util.hpp"

namespace expertlink::reference {
namespace {

using testing::throws_with;
using workload::Routing;

std::vector<int64_t> tokens_of(std::initializer_list<int64_t> t) {
  return t;
}

// Recomputes everything the contract promises for a dispatch and compares it with the oracle's result.
void expect_dispatch_contract(const HtDispatchParams& p, const std::vector<HtDispatchInput>& in,
                              const std::vector<HtDispatchOutput>& out) {
  const int num_ranks = static_cast<int>(in.size());
  const int local = p.num_experts / num_ranks;
  const int k_count = p.topk;
  ASSERT_EQ(static_cast<int>(out.size()), num_ranks);
  for (int d = 0; d < num_ranks; ++d) {
    const HtDispatchOutput& o = out[d];
    const HtHandle& h = o.handle;
    ASSERT_EQ(h.rank, d);
    ASSERT_EQ(h.num_tokens, in[d].x.rows);
    int64_t row = 0;
    std::vector<int32_t> counts(static_cast<size_t>(local), 0);
    for (int s = 0; s < num_ranks; ++s) {
      ASSERT_EQ(h.rank_prefix[s], row) << "rank " << d << " rank_prefix[" << s << "]";
      for (int64_t t = 0; t < in[s].x.rows; ++t) {
        std::vector<bool> hit(static_cast<size_t>(local), false);
        bool goes = false;
        for (int k = 0; k < k_count; ++k) {
          const int64_t e = in[s].topk_idx[t * k_count + k];
          if (e >= 0 && e / local == d) goes = hit[e % local] = true;
        }
        ASSERT_EQ(out[s].handle.send_row[t * num_ranks + d], goes ? row : -1)
            << "rank " << s << " token " << t;
        if (!goes) continue;
        ASSERT_LT(row, h.num_recv()) << "rank " << d;
        ASSERT_EQ(h.recv_src_rank[row], s) << "rank " << d << " row " << row;
        ASSERT_EQ(h.recv_src_token[row], t) << "rank " << d << " row " << row;
        for (int64_t c = 0; c < in[s].x.hidden; ++c) {
          const float want = in[s].x.value(t, c), got = o.x.value(row, c);
          ASSERT_TRUE(want == got || (std::isnan(want) && std::isnan(got)))
              << "rank " << d << " row " << row << " column " << c << ": expected " << want << ", got "
              << got;
        }
        if (o.x.is_fp8()) {
          for (int64_t g = 0; g < o.x.hidden / kFp8GroupSize; ++g)
            ASSERT_EQ(o.x.scale(row, g), in[s].x.scale(t, g))
                << "rank " << d << " row " << row << " group " << g;
        }
        for (int k = 0; k < k_count; ++k) {
          const int64_t e = in[s].topk_idx[t * k_count + k];
          const bool here = e >= 0 && e / local == d;
          ASSERT_EQ(o.topk_idx[row * k_count + k], here ? e % local : -1) << "rank " << d << " row " << row;
          if (!o.topk_weights.empty()) {
            ASSERT_EQ(o.topk_weights[row * k_count + k], here ? in[s].topk_weights[t * k_count + k] : 0.0f);
          }
        }
        for (int j = 0; j < local; ++j) counts[j] += hit[j];
        ++row;
      }
    }
    ASSERT_EQ(h.num_recv(), row) << "rank " << d;
    for (int j = 0; j < local; ++j) {
      const int32_t a = p.expert_alignment;
      ASSERT_EQ(o.num_recv_tokens_per_expert[j], (counts[j] + a - 1) / a * a)
          << "rank " << d << " expert " << j;
    }
  }
}

HtDispatchParams params(int num_experts, int topk, int alignment = 1) {
  return {num_experts, topk, alignment};
}

// The same rows with no topk_idx: routed by is_token_in_rank alone, as `routed` (a dispatch of them) sent
// them.
std::vector<HtDispatchInput> routed_by_in_rank(const std::vector<HtDispatchInput>& in,
                                               const std::vector<HtDispatchOutput>& routed) {
  std::vector<HtDispatchInput> bare(in.size());
  for (size_t r = 0; r < in.size(); ++r) {
    bare[r].x = in[r].x;
    bare[r].is_token_in_rank = routed[r].handle.is_token_in_rank;
  }
  return bare;
}

TEST(HtDispatch, ContractHoldsOnOneTwoThreeFourAndEightRanks) {
  for (int num_ranks : {1, 2, 3, 4, 8}) {
    std::vector<int64_t> tokens;
    for (int r = 0; r < num_ranks; ++r) tokens.push_back(37 + 11 * r);
    for (Routing routing : {Routing::kUniform, Routing::kSkewed}) {
      const auto p = params(16 * num_ranks, 8);
      const auto in = testing::ht_inputs(tokens, 256, 8, p.num_experts, 42, false, routing, 20);
      SCOPED_TRACE(std::to_string(num_ranks) + " ranks, " + workload::routing_name(routing));
      expect_dispatch_contract(p, in, ht_dispatch(p, in));
    }
  }
}

TEST(HtDispatch, ReceivedRowsSumToRoutedTokenRankPairs) {
  const auto in =
      testing::ht_inputs(tokens_of({64, 80, 48, 96}), 128, 6, 32, 9, false, Routing::kUniform, 40);
  const auto out = ht_dispatch(params(32, 6), in);
  int64_t pairs = 0, received = 0;
  for (int s = 0; s < 4; ++s) {
    const DispatchLayout layout = get_dispatch_layout(in[s].topk_idx, in[s].x.rows, 6, 32, 4);
    for (int d = 0; d < 4; ++d) {
      pairs += layout.num_tokens_per_rank[d];
      EXPECT_EQ(out[d].handle.rank_prefix[s + 1] - out[d].handle.rank_prefix[s],
                layout.num_tokens_per_rank[d])
          << "source " << s << " destination " << d;
    }
  }
  for (int d = 0; d < 4; ++d) received += out[d].handle.num_recv();
  EXPECT_EQ(received, pairs);
}

TEST(HtDispatch, MaskedSlotsAreNeverRoutedAndAllMaskedTokenGoesNowhere) {
  auto in = testing::ht_inputs(tokens_of({6, 6}), 128, 3, 8, 1);
  for (int k = 0; k < 3; ++k) in[0].topk_idx[2 * 3 + k] = -1;  // token 2 of rank 0: nowhere
  in[1].topk_idx[0] = -1;
  in[1].topk_idx[1] = 5;
  in[1].topk_idx[2] = -1;  // token 0 of rank 1: rank 1 only
  const auto out = ht_dispatch(params(8, 3), in);
  for (int d = 0; d < 2; ++d) {
    EXPECT_EQ(out[0].handle.send_row[2 * 2 + d], -1);
    for (int64_t i = 0; i < out[d].handle.num_recv(); ++i)
      EXPECT_FALSE(out[d].handle.recv_src_rank[i] == 0 && out[d].handle.recv_src_token[i] == 2);
  }
  EXPECT_EQ(out[1].handle.send_row[0 * 2 + 0], -1);
  EXPECT_GE(out[1].handle.send_row[0 * 2 + 1], 0);
  expect_dispatch_contract(params(8, 3), in, out);
}

TEST(HtDispatch, RanksWithZeroTokensSendNothingAndReceive) {
  const auto in = testing::ht_inputs(tokens_of({0, 20, 0}), 128, 4, 12, 3);
  const auto out = ht_dispatch(params(12, 4), in);
  expect_dispatch_contract(params(12, 4), in, out);
  for (int d = 0; d < 3; ++d) {
    EXPECT_EQ(out[d].handle.rank_prefix[1], 0);
    EXPECT_EQ(out[d].handle.rank_prefix[3], out[d].handle.rank_prefix[2]);
  }
  const auto none = testing::ht_inputs(tokens_of({0, 0}), 128, 4, 8, 3);
  const auto empty = ht_dispatch(params(8, 4), none);
  EXPECT_EQ(empty[0].handle.num_recv() + empty[1].handle.num_recv(), 0);
}

TEST(HtDispatch, SingleTokenWithOddTopkOneThreeNine) {
  for (int topk : {1, 3, 9}) {
    const auto in = testing::ht_inputs(tokens_of({1, 1, 1}), 128, topk, 18, 5 + topk);
    SCOPED_TRACE("topk " + std::to_string(topk));
    expect_dispatch_contract(params(18, topk), in, ht_dispatch(params(18, topk), in));
  }
}

TEST(HtDispatch, Topk32With1024ExpertsOnEightRanks) {
  std::vector<int64_t> tokens(8, 5);
  const auto in = testing::ht_inputs(tokens, 128, 32, 1024, 77);
  expect_dispatch_contract(params(1024, 32), in, ht_dispatch(params(1024, 32), in));
}

TEST(HtDispatch, DuplicateExpertSendsOneRowKeepsBothSlotsAndCountsOnce) {
  auto in = testing::ht_inputs(tokens_of({1, 1}), 128, 3, 4, 2);
  in[0].topk_idx = {3, 3, 0};
  in[0].topk_weights = {0.5f, 0.25f, 1.0f};
  const auto out = ht_dispatch(params(4, 3), in);
  expect_dispatch_contract(params(4, 3), in, out);
  ASSERT_EQ(out[1].handle.rank_prefix[1], 1);  // one row from rank 0 on rank 1
  EXPECT_EQ(out[1].topk_idx[0], 1);
  EXPECT_EQ(out[1].topk_idx[1], 1);
  EXPECT_EQ(out[1].topk_idx[2], -1);
  EXPECT_EQ(out[1].topk_weights[1], 0.25f);
  int32_t from0 = 0;  // rank 1's count of local expert 1 includes rank 0's token once
  for (int64_t i = 0; i < out[1].handle.num_recv(); ++i)
    for (int k = 0; k < 3; ++k)
      if (out[1].topk_idx[i * 3 + k] == 1) {
        ++from0;
        break;
      }
  EXPECT_EQ(out[1].num_recv_tokens_per_expert[1], from0);
}

TEST(HtDispatch, ExpertAlignmentPadsPerExpertCounts) {
  const auto in = testing::ht_inputs(tokens_of({50, 70}), 128, 4, 16, 8);
  const auto plain = ht_dispatch(params(16, 4, 1), in);
  for (int alignment : {2, 7, 128}) {
    const auto padded = ht_dispatch(params(16, 4, alignment), in);
    expect_dispatch_contract(params(16, 4, alignment), in, padded);
    for (int d = 0; d < 2; ++d)
      for (int j = 0; j < 8; ++j) {
        const int32_t c = plain[d].num_recv_tokens_per_expert[j],
                      got = padded[d].num_recv_tokens_per_expert[j];
        EXPECT_EQ(got % alignment, 0);
        EXPECT_TRUE(got >= c && got < c + alignment)
            << "alignment " << alignment << ": " << c << " -> " << got;
      }
  }
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(16, 4, 0), in); }, {"expert_alignment = 0"}));
}

TEST(HtDispatch, Fp8RowsAndBothScaleFormatsAreCopiedBitwise) {
  for (bool ue8m0 : {false, true}) {
    auto in = testing::ht_inputs(tokens_of({9, 4, 13}), 640, 4, 12, 21);
    for (auto& r : in) r.x = cast_to_fp8(r.x, true, ue8m0);
    const auto out = ht_dispatch(params(12, 4), in);
    SCOPED_TRACE(ue8m0 ? "ue8m0" : "float scales");
    expect_dispatch_contract(params(12, 4), in, out);
    for (int d = 0; d < 3; ++d) {
      const HtHandle& h = out[d].handle;
      for (int64_t i = 0; i < h.num_recv(); ++i) {
        const TokenRows& src = in[h.recv_src_rank[i]].x;
        const int64_t t = h.recv_src_token[i];
        ASSERT_TRUE(std::equal(src.fp8.begin() + t * 640, src.fp8.begin() + (t + 1) * 640,
                               out[d].x.fp8.begin() + i * 640));
        if (ue8m0) {
          ASSERT_TRUE(std::equal(src.packed_scales.begin() + t * 2, src.packed_scales.begin() + t * 2 + 2,
                                 out[d].x.packed_scales.begin() + i * 2));
        }
      }
    }
  }
}

TEST(HtDispatch, OrderingIsDeterministicAcrossRuns) {
  const auto in = testing::ht_inputs(tokens_of({30, 31, 29}), 128, 5, 30, 13);
  const auto a = ht_dispatch(params(30, 5), in), b = ht_dispatch(params(30, 5), in);
  for (int d = 0; d < 3; ++d) {
    EXPECT_EQ(a[d].x.bf16, b[d].x.bf16);
    EXPECT_EQ(a[d].handle.recv_src_token, b[d].handle.recv_src_token);
    EXPECT_EQ(a[d].handle.recv_src_rank, b[d].handle.recv_src_rank);
    EXPECT_TRUE(std::is_sorted(a[d].handle.recv_src_rank.begin(), a[d].handle.recv_src_rank.end()));
  }
}

TEST(HtDispatch, RoutingFromIsTokenInRankAloneAndContradictionRejected) {
  auto in = testing::ht_inputs(tokens_of({10, 12}), 128, 2, 4, 4);
  const auto with_topk = ht_dispatch(params(4, 2), in);
  auto bare = routed_by_in_rank(in, with_topk);
  const auto out = ht_dispatch(params(4, 0), bare);
  for (int d = 0; d < 2; ++d) {
    EXPECT_EQ(out[d].x.bf16, with_topk[d].x.bf16);
    EXPECT_EQ(out[d].handle.send_row, with_topk[d].handle.send_row);
    EXPECT_TRUE(out[d].topk_idx.empty() && out[d].num_recv_tokens_per_expert.empty());
  }
  in[1].is_token_in_rank = with_topk[1].handle.is_token_in_rank;
  in[1].is_token_in_rank[3] ^= 1;
  EXPECT_TRUE(
      throws_with([&] { ht_dispatch(params(4, 2), in); }, {"rank 1: is_token_in_rank[1][1]", "contradicts"}));
  bare[0].is_token_in_rank.clear();
  EXPECT_TRUE(
      throws_with([&] { ht_dispatch(params(4, 0), bare); }, {"rank 0: is_token_in_rank has 0 elements"}));
}

TEST(HtDispatch, InvalidArgumentsRejectedWithNamedMessages) {
  const auto good = testing::ht_inputs(tokens_of({4, 4}), 256, 2, 8, 1);
  auto in = good;
  in[1].topk_idx[2 * 2 + 1] = 300;
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(8, 2), in); },
                          {"rank 1: topk_idx[2][1] = 300 is not an expert: num_experts = 8"}));
  in = good;
  in[0].topk_idx[0] = -5;
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(8, 2), in); }, {"rank 0: topk_idx[0][0] = -5"}));
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(9, 2), good); },
                          {"num_experts = 9 is not a multiple of num_ranks = 2"}));
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(2048, 2), good); }, {"num_experts = 2048"}));
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(8, 33), good); }, {"topk = 33"}));
  in = good;
  in[1].topk_weights.pop_back();
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(8, 2), in); }, {"rank 1: topk_weights has 7 elements"}));
  in = good;
  in[0].x.bf16.pop_back();
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(8, 2), in); }, {"rank 0: x.bf16 has 1023 elements"}));
  in = good;
  in[1].x = bf16_rows(4, 128, std::vector<uint16_t>(512, 0));
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(8, 2), in); }, {"rank 1: x is bf16 with hidden = 128"}));
  in = good;
  for (int r = 0; r < 2; ++r) {
    in[r].x = make_token_rows(RowFormat::kBf16, 4, 200);
    in[r].x.format = RowFormat::kFp8;
  }
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(8, 2), in); }, {"rank 0: x.hidden = 200", "128"}));
  EXPECT_TRUE(throws_with([&] { ht_dispatch(params(8, 2), {}); }, {"inputs is empty"}));
}

// ---------------------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------------------

std::vector<HtCombineInput> identity_combine_inputs(const std::vector<HtDispatchOutput>& out) {
  std::vector<HtCombineInput> in(out.size());
  for (size_t d = 0; d < out.size(); ++d) {
    in[d].x = out[d].x.bf16;
    in[d].topk_weights = out[d].topk_weights;
  }
  return in;
}

std::vector<HtHandle> handles_of(const std::vector<HtDispatchOutput>& out) {
  std::vector<HtHandle> h;
  for (const auto& o : out) h.push_back(o.handle);
  return h;
}

TEST(HtCombine, CombineOfDispatchIsXTimesDistinctDestinationRanks) {
  for (int num_ranks : {1, 2, 3, 4, 8}) {
    std::vector<int64_t> tokens;
    for (int r = 0; r < num_ranks; ++r) tokens.push_back(r == 1 ? 0 : 25 + r);
    const int experts = 6 * num_ranks;
    // Small integers: x times at most 8 ranks stays exact in BF16, so the check is exact.
    const auto in = testing::ht_inputs(tokens, 384, 5, experts, 100 + num_ranks, true, Routing::kUniform, 12);
    const auto out = ht_dispatch(params(experts, 5), in);
    const auto comb = ht_combine_explicit(handles_of(out), identity_combine_inputs(out), 384, true);
    for (int s = 0; s < num_ranks; ++s) {
      std::vector<uint16_t> want(static_cast<size_t>(tokens[s] * 384));
      for (int64_t t = 0; t < tokens[s]; ++t) {
        int ranks = 0;
        for (int d = 0; d < num_ranks; ++d) ranks += out[s].handle.is_token_in_rank[t * num_ranks + d];
        for (int64_t c = 0; c < 384; ++c)
          want[t * 384 + c] =
              float_to_bf16(static_cast<float>(ranks) * bf16_to_float(in[s].x.bf16[t * 384 + c]));
      }
      EXPECT_TRUE(testing::same_elements(want, comb[s].x, 384)) << num_ranks << " ranks, source rank " << s;
    }
  }
}

TEST(HtCombine, ReducedTopkWeightsRestoreTheOriginalsOfValidSlots) {
  const auto in = testing::ht_inputs(tokens_of({40, 33, 27}), 128, 7, 21, 61, false, Routing::kSkewed, 15);
  const auto out = ht_dispatch(params(21, 7), in);
  const auto comb = ht_combine_explicit(handles_of(out), identity_combine_inputs(out), 128, true);
  for (int s = 0; s < 3; ++s) {
    std::vector<float> want = in[s].topk_weights;
    for (size_t i = 0; i < want.size(); ++i)
      if (in[s].topk_idx[i] < 0) want[i] = 0.0f;
    EXPECT_TRUE(testing::same_elements(want, comb[s].topk_weights, 7)) << "source rank " << s;
  }
}

TEST(HtCombine, FloatSumInRankOrderPlusBiasesRoundedOnceMatchesRecomputation) {
  const auto in = testing::ht_inputs(tokens_of({31, 17, 22, 9}), 256, 6, 16, 5, false, Routing::kUniform, 10);
  const auto out = ht_dispatch(params(16, 6), in);
  auto cin = identity_combine_inputs(out);
  // Expert outputs differ from the inputs: each receiving rank scales its rows differently.
  for (int d = 0; d < 4; ++d)
    for (auto& v : cin[d].x) v = float_to_bf16(bf16_to_float(v) * (1.5f + static_cast<float>(d)));
  for (int s = 0; s < 4; ++s) {
    cin[s].bias0 = workload::make_bf16(static_cast<size_t>(in[s].x.rows * 256), 900, s);
    if (s % 2 == 0) cin[s].bias1 = workload::make_bf16(static_cast<size_t>(in[s].x.rows * 256), 901, s);
  }
  const auto comb = ht_combine_explicit(handles_of(out), cin, 256, true);
  for (int s = 0; s < 4; ++s) {
    std::vector<uint16_t> want(static_cast<size_t>(in[s].x.rows * 256));
    for (int64_t t = 0; t < in[s].x.rows; ++t) {
      for (int64_t c = 0; c < 256; ++c) {
        float acc = 0.0f;
        for (int d = 0; d < 4; ++d) {
          const int32_t row = out[s].handle.send_row[t * 4 + d];
          if (row >= 0) acc += bf16_to_float(cin[d].x[row * 256 + c]);
        }
        acc += bf16_to_float(cin[s].bias0[t * 256 + c]);
        if (!cin[s].bias1.empty()) acc += bf16_to_float(cin[s].bias1[t * 256 + c]);
        want[t * 256 + c] = float_to_bf16(acc);
      }
    }
    EXPECT_TRUE(testing::same_elements(want, comb[s].x, 256)) << "source rank " << s;
  }
}

TEST(HtCombine, TokenThatWentNowhereGetsBiasOrZeros) {
  auto in = testing::ht_inputs(tokens_of({3, 3}), 128, 2, 4, 6);
  in[0].topk_idx[2] = in[0].topk_idx[3] = -1;  // token 1 of rank 0
  const auto out = ht_dispatch(params(4, 2), in);
  auto cin = identity_combine_inputs(out);
  auto comb = ht_combine_explicit(handles_of(out), cin, 128, true);
  for (int64_t c = 0; c < 128; ++c) EXPECT_EQ(comb[0].x[128 + c], 0) << "column " << c;
  for (int k = 0; k < 2; ++k) EXPECT_EQ(comb[0].topk_weights[2 + k], 0.0f) << "slot " << k;
  cin[0].bias0 = testing::small_int_bf16(3 * 128, 4);
  comb = ht_combine_explicit(handles_of(out), cin, 128, true);
  for (int64_t c = 0; c < 128; ++c) EXPECT_EQ(comb[0].x[128 + c], cin[0].bias0[128 + c]) << "column " << c;
}

TEST(HtCombine, ShapeMismatchesRejectedNamingRankAndArgument) {
  const auto in = testing::ht_inputs(tokens_of({5, 6}), 128, 2, 4, 7);
  const auto out = ht_dispatch(params(4, 2), in);
  auto cin = identity_combine_inputs(out);
  cin[1].x.pop_back();
  EXPECT_TRUE(throws_with([&] { ht_combine_explicit(handles_of(out), cin, 128, true); }, {"rank 1: x has"}));
  cin = identity_combine_inputs(out);
  cin[0].bias1.assign(10, 0);
  EXPECT_TRUE(throws_with([&] { ht_combine_explicit(handles_of(out), cin, 128, true); },
                          {"rank 0: bias1 has 10 elements"}));
  cin = identity_combine_inputs(out);
  cin[0].topk_weights.pop_back();
  EXPECT_TRUE(throws_with([&] { ht_combine_explicit(handles_of(out), cin, 128, true); },
                          {"rank 0: topk_weights has"}));
  EXPECT_TRUE(throws_with([&] { ht_combine(handles_of(out), cin, 128); }, {"rank 0: topk_weights has"}));
  auto handles = handles_of(out);
  std::swap(handles[0], handles[1]);
  EXPECT_TRUE(throws_with([&] { ht_combine_explicit(handles, identity_combine_inputs(out), 128, true); },
                          {"handles[0] has rank = 1"}));
}

TEST(HtCombine, SummedWeightsAreZerosWhereNoRankReceivedARow) {
  // Every slot -1: no rank receives a row, so every rank's received weights are [0, K] (empty).
  const auto in = testing::ht_inputs(tokens_of({4, 0, 7}), 128, 3, 6, 8, false, Routing::kUniform, 11 * 3);
  const auto out = ht_dispatch(params(6, 3), in);
  for (const auto& o : out) ASSERT_EQ(o.handle.num_recv(), 0);
  const auto cin = identity_combine_inputs(out);
  const auto summed = ht_combine_explicit(handles_of(out), cin, 128, true);
  const auto shorthand = ht_combine(handles_of(out), cin, 128);
  for (int s = 0; s < 3; ++s) {
    const std::vector<float> zeros(static_cast<size_t>(in[s].x.rows * 3), 0.0f);
    EXPECT_TRUE(testing::same_elements(zeros, summed[s].topk_weights, 3)) << "source rank " << s;
    EXPECT_TRUE(testing::same_elements(summed[s].x, shorthand[s].x, 128)) << "source rank " << s;
    // The shorthand decides from the (all empty) inputs: no weights out.
    EXPECT_TRUE(shorthand[s].topk_weights.empty()) << "source rank " << s;
  }
}

TEST(HtCombine, WeightsFlagOffGivesNoWeightsAndRejectsGivenOnes) {
  const auto in = testing::ht_inputs(tokens_of({9, 5}), 128, 4, 8, 12);
  const auto out = ht_dispatch(params(8, 4), in);
  auto cin = identity_combine_inputs(out);
  const auto summed = ht_combine_explicit(handles_of(out), cin, 128, true);
  EXPECT_TRUE(throws_with([&] { ht_combine_explicit(handles_of(out), cin, 128, false); },
                          {"rank 0: topk_weights has", "sum_topk_weights is off"}));
  for (auto& c : cin) c.topk_weights.clear();
  const auto plain = ht_combine_explicit(handles_of(out), cin, 128, false);
  EXPECT_TRUE(throws_with([&] { ht_combine_explicit(handles_of(out), cin, 128, true); },
                          {"rank 0: topk_weights has 0 elements"}));
  for (int s = 0; s < 2; ++s) {
    EXPECT_TRUE(plain[s].topk_weights.empty()) << "source rank " << s;
    EXPECT_TRUE(testing::same_elements(summed[s].x, plain[s].x, 128)) << "source rank " << s;
  }
}

TEST(HtCombine, ShorthandSumsWeightsExactlyWhenSomeRankPassesThem) {
  const auto in = testing::ht_inputs(tokens_of({13, 8, 10}), 128, 3, 9, 14);
  const auto out = ht_dispatch(params(9, 3), in);
  auto cin = identity_combine_inputs(out);
  auto explicit_on = ht_combine_explicit(handles_of(out), cin, 128, true);
  auto shorthand = ht_combine(handles_of(out), cin, 128);
  for (int s = 0; s < 3; ++s) {
    EXPECT_TRUE(testing::same_elements(explicit_on[s].x, shorthand[s].x, 128)) << "source rank " << s;
    EXPECT_TRUE(testing::same_elements(explicit_on[s].topk_weights, shorthand[s].topk_weights, 3))
        << "source rank " << s;
  }
  for (auto& c : cin) c.topk_weights.clear();
  shorthand = ht_combine(handles_of(out), cin, 128);
  for (int s = 0; s < 3; ++s) EXPECT_TRUE(shorthand[s].topk_weights.empty()) << "source rank " << s;
}

TEST(HtCombine, SummingWeightsNeedsADispatchWithTopkIdx) {
  const auto in = testing::ht_inputs(tokens_of({6, 4}), 128, 2, 4, 15);
  const auto out = ht_dispatch(params(4, 0), routed_by_in_rank(in, ht_dispatch(params(4, 2), in)));
  const auto cin = identity_combine_inputs(out);
  EXPECT_TRUE(throws_with([&] { ht_combine_explicit(handles_of(out), cin, 128, true); },
                          {"sum_topk_weights", "handle topk = 0"}));
  const auto plain = ht_combine_explicit(handles_of(out), cin, 128, false);
  for (int s = 0; s < 2; ++s) EXPECT_TRUE(plain[s].topk_weights.empty()) << "source rank " << s;
}

TEST(HtDispatchCached, SameRowsAsTheOriginalDispatchAndIsCombinesAdjoint) {
  const auto in = testing::ht_inputs(tokens_of({12, 0, 19}), 256, 4, 12, 31);
  const auto out = ht_dispatch(params(12, 4), in);
  std::vector<TokenRows> x;
  for (const auto& r : in) x.push_back(r.x);
  const auto cached = ht_dispatch_cached(handles_of(out), x);
  for (int d = 0; d < 3; ++d)
    EXPECT_TRUE(testing::same_elements(out[d].x.bf16, cached[d].bf16, 256)) << "rank " << d;
  x[0].rows = 11;
  EXPECT_TRUE(throws_with([&] { ht_dispatch_cached(handles_of(out), x); }, {"rank 0: x"}));
}

}  // namespace
}  // namespace expertlink::reference
