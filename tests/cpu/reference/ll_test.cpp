// Low-latency dispatch and combine of the oracle, checked against direct recomputation of the contract
// (reference.hpp) and against round-trip properties.
#include <algorithm>
#include <random>

#include "test_util.hpp"

namespace expertlink::reference {
namespace {

using testing::throws_with;
using workload::Routing;

std::vector<LlDispatchInput> ll_inputs(const std::vector<int64_t>& tokens, int64_t hidden, int topk,
                                       int num_experts, uint64_t seed, int masked_slots = 0,
                                       bool small_ints = false) {
  const int num_ranks = static_cast<int>(tokens.size());
  std::vector<LlDispatchInput> in(tokens.size());
  for (int r = 0; r < num_ranks; ++r) {
    const auto n = static_cast<size_t>(tokens[r] * hidden);
    in[r].num_tokens = tokens[r];
    in[r].x = small_ints ? testing::small_int_bf16(n, r) : workload::make_bf16(n, seed, r);
    in[r].topk_idx = workload::make_topk_idx(tokens[r], topk, num_experts, num_ranks, Routing::kUniform, seed,
                                             r, masked_slots);
  }
  return in;
}

LlDispatchParams ll_params(int num_experts, int64_t hidden, int topk, int64_t capacity, bool fp8,
                           bool round_scale = false, bool ue8m0 = false) {
  LlDispatchParams p;
  p.num_experts = num_experts;
  p.hidden = hidden;
  p.topk = topk;
  p.num_max_dispatch_tokens_per_rank = capacity;
  p.use_fp8 = fp8;
  p.round_scale = round_scale;
  p.use_ue8m0 = ue8m0;
  return p;
}

// Recomputes the contract: per expert, the sources in (rank, token) order compacted at the front, each row
// the source row (cast by cast_to_fp8 when FP8), ranges per source rank, poison after recv_count.
void expect_ll_contract(const LlDispatchParams& p, const std::vector<LlDispatchInput>& in,
                        const std::vector<LlDispatchOutput>& out) {
  const int num_ranks = static_cast<int>(in.size());
  const int local = p.num_experts / num_ranks;
  const int64_t slots = num_ranks * p.num_max_dispatch_tokens_per_rank, hidden = p.hidden;
  std::vector<TokenRows> sent;
  for (const auto& r : in)
    sent.push_back(p.use_fp8 ? cast_to_fp8(r.x.data(), r.num_tokens, hidden, p.round_scale, p.use_ue8m0)
                             : bf16_rows(r.num_tokens, hidden, r.x));
  for (int d = 0; d < num_ranks; ++d) {
    const LlHandle& h = out[d].handle;
    const TokenRows& x = out[d].x;
    ASSERT_EQ(x.rows, local * slots);
    for (int j = 0; j < local; ++j) {
      const int64_t e = int64_t{d} * local + j;
      int32_t pos = 0;
      for (int s = 0; s < num_ranks; ++s) {
        ASSERT_EQ(h.range_begin[j * num_ranks + s], pos)
            << "rank " << d << " expert " << j << " source " << s;
        for (int64_t t = 0; t < in[s].num_tokens; ++t) {
          bool picked = false;
          for (int k = 0; k < p.topk; ++k) picked = picked || in[s].topk_idx[t * p.topk + k] == e;
          if (!picked) continue;
          const int64_t row = j * slots + pos;
          ASSERT_EQ(h.src_rank[row], s) << "rank " << d << " expert " << j << " slot " << pos;
          ASSERT_EQ(h.src_token[row], t) << "rank " << d << " expert " << j << " slot " << pos;
          if (p.use_fp8) {
            for (int64_t c = 0; c < hidden; ++c)
              ASSERT_EQ(x.fp8[row * hidden + c], sent[s].fp8[t * hidden + c])
                  << "rank " << d << " expert " << j << " slot " << pos << " column " << c;
            for (int64_t g = 0; g < hidden / kFp8GroupSize; ++g)
              ASSERT_EQ(x.scale(row, g), sent[s].scale(t, g))
                  << "rank " << d << " expert " << j << " slot " << pos;
          } else {
            for (int64_t c = 0; c < hidden; ++c)
              ASSERT_EQ(x.bf16[row * hidden + c], in[s].x[t * hidden + c])
                  << "rank " << d << " expert " << j << " slot " << pos << " column " << c;
          }
          ++pos;
        }
        ASSERT_EQ(h.range_begin[j * num_ranks + s] + h.range_count[j * num_ranks + s], pos);
      }
      ASSERT_EQ(h.recv_count[j], pos) << "rank " << d << " expert " << j;
      for (int64_t i = pos; i < slots; ++i) {
        ASSERT_EQ(h.src_rank[j * slots + i], -1);
        ASSERT_EQ(h.src_token[j * slots + i], -1);
        if (!p.use_fp8) {
          ASSERT_EQ(x.bf16[(j * slots + i) * hidden], 0xFFFF) << "poison of unused slot " << i;
        }
      }
    }
  }
}

std::vector<LlHandle> handles_of(const std::vector<LlDispatchOutput>& out) {
  std::vector<LlHandle> h;
  for (const auto& o : out) h.push_back(o.handle);
  return h;
}

TEST(LlDispatch, Bf16ContractHoldsOnOneTwoThreeFourAndEightRanks) {
  for (int num_ranks : {1, 2, 3, 4, 8}) {
    std::vector<int64_t> tokens;
    for (int r = 0; r < num_ranks; ++r) tokens.push_back(r == 2 ? 0 : 20 - r);
    const auto p = ll_params(9 * num_ranks, 192, 8, 24, false);
    const auto in = ll_inputs(tokens, 192, 8, p.num_experts, 3 + num_ranks, 10);
    SCOPED_TRACE(std::to_string(num_ranks) + " ranks");
    expect_ll_contract(p, in, ll_dispatch(p, in));
  }
}

TEST(LlDispatch, Fp8CastInsideEqualsPerRowCastForFloatRoundedAndUe8m0Scales) {
  const auto in = ll_inputs({13, 16, 7}, 640, 6, 12, 17, 10);
  for (auto [round_scale, ue8m0] : {std::pair{false, false}, {true, false}, {true, true}}) {
    const auto p = ll_params(12, 640, 6, 16, true, round_scale, ue8m0);
    const auto out = ll_dispatch(p, in);
    SCOPED_TRACE(std::string("round_scale ") + (round_scale ? "1" : "0") + " ue8m0 " + (ue8m0 ? "1" : "0"));
    EXPECT_EQ(out[0].x.format, ue8m0 ? RowFormat::kFp8Ue8m0 : RowFormat::kFp8);
    expect_ll_contract(p, in, out);
  }
}

TEST(LlDispatch, ValidPrefixPerExpertAndUnusedSlotsArePoison) {
  const auto p = ll_params(4, 128, 2, 8, true);
  const auto in = ll_inputs({3, 5}, 128, 2, 4, 23);
  const auto out = ll_dispatch(p, in);
  for (int d = 0; d < 2; ++d) {
    const LlHandle& h = out[d].handle;
    for (int j = 0; j < 2; ++j) {
      for (int64_t i = h.recv_count[j]; i < h.slots_per_expert(); ++i) {
        const int64_t row = j * h.slots_per_expert() + i;
        EXPECT_EQ(out[d].x.fp8[row * 128], 0xFF);
        EXPECT_TRUE(std::isnan(out[d].x.scales[row]));
      }
    }
  }
}

TEST(LlDispatch, TokensAboveCapacityRejectedNamingTAndN) {
  const auto in = ll_inputs({4, 9}, 128, 2, 4, 1);
  EXPECT_TRUE(throws_with([&] { ll_dispatch(ll_params(4, 128, 2, 8, true), in); },
                          {"rank 1: num_tokens = 9 exceeds num_max_dispatch_tokens_per_rank = 8"}));
  EXPECT_NO_THROW(ll_dispatch(ll_params(4, 128, 2, 9, true), in));
}

TEST(LlDispatch, InvalidArgumentsRejectedWithNamedMessages) {
  auto in = ll_inputs({2, 2}, 256, 2, 8, 1);
  EXPECT_TRUE(throws_with([&] { ll_dispatch(ll_params(8, 200, 2, 4, true), in); }, {"hidden = 200", "128"}));
  EXPECT_TRUE(throws_with([&] { ll_dispatch(ll_params(8, 256, 2, 4, true, false, true), in); },
                          {"use_ue8m0", "round_scale"}));
  EXPECT_TRUE(throws_with([&] { ll_dispatch(ll_params(8, 256, 2, 0, true), in); },
                          {"num_max_dispatch_tokens_per_rank = 0"}));
  EXPECT_TRUE(throws_with(
      [&] {
        ll_dispatch(ll_params(6, 256, 2, 4, true), ll_inputs({2, 2, 2, 2}, 256, 2, 8, 1));
      },
      {"num_experts = 6 is not a multiple of num_ranks = 4"}));
  in[0].topk_idx[3] = 8;
  EXPECT_TRUE(throws_with([&] { ll_dispatch(ll_params(8, 256, 2, 4, true), in); },
                          {"rank 0: topk_idx[1][1] = 8 is not an expert: num_experts = 8"}));
  in = ll_inputs({2, 2}, 256, 2, 8, 1);
  in[1].x.resize(10);
  EXPECT_TRUE(
      throws_with([&] { ll_dispatch(ll_params(8, 256, 2, 4, true), in); }, {"rank 1: x has 10 elements"}));
  EXPECT_NO_THROW(
      ll_dispatch(ll_params(8, 200, 2, 4, false), ll_inputs({2, 2}, 200, 2, 8, 1)));  // BF16: any hidden
}

TEST(LlDispatch, DuplicateExpertInATokenSendsOneRow) {
  auto in = ll_inputs({2, 1}, 128, 3, 4, 5);
  in[0].topk_idx = {1, 1, -1, 3, 0, 3};
  const auto p = ll_params(4, 128, 3, 4, false);
  const auto out = ll_dispatch(p, in);
  expect_ll_contract(p, in, out);
  EXPECT_EQ(out[0].handle.range_count[1 * 2 + 0], 1);  // expert 1 holds token 0 of rank 0 once
  EXPECT_EQ(out[1].handle.range_count[1 * 2 + 0], 1);  // expert 3 holds token 1 of rank 0 once
}

TEST(LlDispatch, SingleTokenOddTopkAndAllMaskedTokens) {
  for (int topk : {1, 3, 9}) {
    auto in = ll_inputs({1, 1, 1}, 128, topk, 27, 40 + topk);
    std::fill(in[2].topk_idx.begin(), in[2].topk_idx.end(), -1);  // rank 2's token goes nowhere
    const auto p = ll_params(27, 128, topk, 1, true);
    const auto out = ll_dispatch(p, in);
    SCOPED_TRACE("topk " + std::to_string(topk));
    expect_ll_contract(p, in, out);
    for (int d = 0; d < 3; ++d)
      for (int j = 0; j < 9; ++j) EXPECT_EQ(out[d].handle.range_count[j * 3 + 2], 0);
  }
}

TEST(LlDispatch, Topk32With1024ExpertsOnEightRanks) {
  const auto p = ll_params(1024, 128, 32, 3, true, true, true);
  const auto in = ll_inputs({3, 2, 3, 1, 0, 3, 3, 2}, 128, 32, 1024, 8, 5);
  expect_ll_contract(p, in, ll_dispatch(p, in));
}

TEST(LlDispatch, CanonicalizeRestoresOracleOrderFromShuffledBlocksAndSlots) {
  const auto p = ll_params(8, 128, 4, 12, true, true, false);
  const auto in = ll_inputs({12, 9, 11, 4}, 128, 4, 8, 29, 6);
  const auto out = ll_dispatch(p, in);
  std::mt19937_64 rng(5);
  for (int d = 0; d < 4; ++d) {
    // Rebuild the output as a GPU might leave it: source-rank blocks in shuffled order, tokens shuffled
    // within each block, src_rank left unfilled (-1).
    LlDispatchOutput gpu = out[d];
    LlHandle& h = gpu.handle;
    const int64_t slots = h.slots_per_expert();
    for (int j = 0; j < 2; ++j) {
      std::vector<int> order = {0, 1, 2, 3};
      std::shuffle(order.begin(), order.end(), rng);
      int32_t pos = 0;
      for (int s : order) {
        std::vector<int64_t> rows;
        for (int32_t i = 0; i < out[d].handle.range_count[j * 4 + s]; ++i)
          rows.push_back(j * slots + out[d].handle.range_begin[j * 4 + s] + i);
        std::shuffle(rows.begin(), rows.end(), rng);
        h.range_begin[j * 4 + s] = pos;
        for (int64_t r : rows) {
          gpu.x.copy_row(out[d].x, r, j * slots + pos);
          h.src_token[j * slots + pos] = out[d].handle.src_token[r];
          h.src_rank[j * slots + pos] = -1;
          ++pos;
        }
      }
    }
    canonicalize_ll_recv(gpu);
    EXPECT_TRUE(testing::same_elements(out[d].x.fp8, gpu.x.fp8, 128)) << "rank " << d;
    EXPECT_EQ(out[d].x.scales.size(), gpu.x.scales.size());
    for (size_t i = 0; i < gpu.x.scales.size(); ++i) {
      const float a = out[d].x.scales[i], b = gpu.x.scales[i];
      ASSERT_TRUE(a == b || (std::isnan(a) && std::isnan(b))) << "rank " << d << " scale " << i;
    }
    EXPECT_EQ(out[d].handle.src_rank, gpu.handle.src_rank);
    EXPECT_EQ(out[d].handle.src_token, gpu.handle.src_token);
    EXPECT_EQ(out[d].handle.range_begin, gpu.handle.range_begin);
    EXPECT_EQ(out[d].handle.range_count, gpu.handle.range_count);
  }
  LlDispatchOutput bad = out[0];
  bad.handle.recv_count[0] += 1;
  EXPECT_TRUE(throws_with([&] { canonicalize_ll_recv(bad); }, {"recv_count[0]"}));
}

// ---------------------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------------------

std::vector<LlCombineInput> combine_inputs(const std::vector<LlDispatchInput>& in,
                                           const std::vector<LlDispatchOutput>& out,
                                           const std::vector<std::vector<float>>& weights) {
  std::vector<LlCombineInput> c(in.size());
  for (size_t r = 0; r < in.size(); ++r) {
    c[r].x = out[r].x.format == RowFormat::kBf16 ? out[r].x.bf16 : std::vector<uint16_t>{};
    if (c[r].x.empty()) {  // FP8 dispatch: the "expert" returns the dequantized row, rounded to BF16
      const auto deq = dequantize(out[r].x);
      c[r].x.resize(deq.size());
      for (size_t i = 0; i < deq.size(); ++i) c[r].x[i] = std::isnan(deq[i]) ? 0x7FFF : float_to_bf16(deq[i]);
    }
    c[r].topk_idx = in[r].topk_idx;
    c[r].topk_weights = weights[r];
  }
  return c;
}

TEST(LlCombine, WeightedSumMatchesStraightforwardRecomputation) {
  for (int num_ranks : {1, 2, 3, 4, 8}) {
    std::vector<int64_t> tokens;
    for (int r = 0; r < num_ranks; ++r) tokens.push_back(r == 1 ? 0 : 10 + r);
    const int experts = 6 * num_ranks;
    const auto p = ll_params(experts, 256, 5, 20, num_ranks % 2 == 0, true);
    const auto in = ll_inputs(tokens, 256, 5, experts, 70 + num_ranks, 8);
    const auto out = ll_dispatch(p, in);
    std::vector<std::vector<float>> weights;
    for (int r = 0; r < num_ranks; ++r)
      weights.push_back(workload::make_topk_weights(in[r].topk_idx, 5, 71, r));
    auto cin = combine_inputs(in, out, weights);
    for (int r = 0; r < num_ranks; ++r)  // every rank's experts transform differently
      for (auto& v : cin[r].x)
        if (v != 0xFFFF) v = float_to_bf16(bf16_to_float(v) * (0.5f + static_cast<float>(r)) - 0.25f);
    const auto comb = ll_combine(handles_of(out), cin);
    const int local = experts / num_ranks;
    const int64_t slots = num_ranks * 20;
    for (int s = 0; s < num_ranks; ++s) {
      std::vector<uint16_t> want(static_cast<size_t>(tokens[s] * 256));
      for (int64_t t = 0; t < tokens[s]; ++t) {
        std::vector<float> acc(256, 0.0f);
        for (int k = 0; k < 5; ++k) {
          const int64_t e = in[s].topk_idx[t * 5 + k];
          if (e < 0) continue;
          const LlHandle& h = out[e / local].handle;
          const int64_t j = e % local;
          int64_t slot = -1;  // find the slot by scanning, independently of the oracle's lookup
          for (int64_t i = 0; i < h.recv_count[j]; ++i)
            if (h.src_rank[j * slots + i] == s && h.src_token[j * slots + i] == t) slot = i;
          ASSERT_GE(slot, 0) << "token " << t << " of rank " << s << " missing on expert " << e;
          for (int64_t c = 0; c < 256; ++c)
            acc[c] += weights[s][t * 5 + k] * bf16_to_float(cin[e / local].x[(j * slots + slot) * 256 + c]);
        }
        for (int64_t c = 0; c < 256; ++c) want[t * 256 + c] = float_to_bf16(acc[c]);
      }
      EXPECT_TRUE(testing::same_elements(want, comb[s], 256)) << num_ranks << " ranks, source rank " << s;
    }
  }
}

TEST(LlCombine, RoundTripOfIdentityExpertsIsXTimesSumOfValidWeights) {
  // Small integers and weights that are multiples of 1/4: every partial sum is exact.
  const auto in = ll_inputs({9, 12, 5}, 384, 4, 12, 3, 7, true);
  const auto out = ll_dispatch(ll_params(12, 384, 4, 12, false), in);
  std::vector<std::vector<float>> weights;
  for (int r = 0; r < 3; ++r) {
    weights.emplace_back(in[r].topk_idx.size());
    for (size_t i = 0; i < weights[r].size(); ++i)
      weights[r][i] = 0.25f * static_cast<float>(1 + (i * 5 + r) % 4);
  }
  const auto comb = ll_combine(handles_of(out), combine_inputs(in, out, weights));
  for (int s = 0; s < 3; ++s) {
    std::vector<float> want(in[s].x.size());
    for (int64_t t = 0; t < in[s].num_tokens; ++t) {
      float w = 0.0f;
      for (int k = 0; k < 4; ++k)
        if (in[s].topk_idx[t * 4 + k] >= 0) w += weights[s][t * 4 + k];
      for (int64_t c = 0; c < 384; ++c) want[t * 384 + c] = w * bf16_to_float(in[s].x[t * 384 + c]);
    }
    EXPECT_TRUE(testing::bf16_close(want, comb[s], 384, 0.0f, 0.0f)) << "source rank " << s;
  }
}

TEST(LlCombine, RepeatedExpertAddsItsRowOncePerSlotAndMaskedTokenGivesZeros) {
  auto in = ll_inputs({2, 1}, 128, 3, 4, 9, 0, true);
  in[0].topk_idx = {2, 2, 0, -1, -1, -1};
  const auto out = ll_dispatch(ll_params(4, 128, 3, 2, false), in);
  std::vector<std::vector<float>> weights = {{0.5f, 0.25f, 1.0f, 1.0f, 1.0f, 1.0f}, {1.0f, 1.0f, 1.0f}};
  const auto comb = ll_combine(handles_of(out), combine_inputs(in, out, weights));
  for (int64_t c = 0; c < 128; ++c) {
    EXPECT_EQ(bf16_to_float(comb[0][c]), 1.75f * bf16_to_float(in[0].x[c])) << "column " << c;
    EXPECT_EQ(comb[0][128 + c], 0) << "column " << c;
  }
}

TEST(LlCombine, ShapeMismatchesRejectedNamingRankAndArgument) {
  const auto in = ll_inputs({3, 4}, 128, 2, 4, 11);
  const auto out = ll_dispatch(ll_params(4, 128, 2, 4, false), in);
  const std::vector<std::vector<float>> weights = {std::vector<float>(6, 1.0f), std::vector<float>(8, 1.0f)};
  auto cin = combine_inputs(in, out, weights);
  cin[1].x.pop_back();
  EXPECT_TRUE(throws_with([&] { ll_combine(handles_of(out), cin); }, {"rank 1: x has"}));
  cin = combine_inputs(in, out, weights);
  cin[0].topk_weights.pop_back();
  EXPECT_TRUE(
      throws_with([&] { ll_combine(handles_of(out), cin); }, {"rank 0: topk_weights has 5 elements"}));
  cin = combine_inputs(in, out, weights);
  cin[0].topk_idx[0] = 7;
  EXPECT_TRUE(throws_with([&] { ll_combine(handles_of(out), cin); }, {"rank 0: topk_idx[0][0] = 7"}));
  cin = combine_inputs(in, out, weights);
  int64_t other = 0;  // an expert token 0 did not pick
  while (other == cin[0].topk_idx[0] || other == cin[0].topk_idx[1]) ++other;
  cin[0].topk_idx[0] = other;
  EXPECT_TRUE(throws_with([&] { ll_combine(handles_of(out), cin); }, {"holds no slot"}));
}

}  // namespace
}  // namespace expertlink::reference
