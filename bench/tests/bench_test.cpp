// CPU tests of el_bench's arithmetic and output: byte counts, floor, options, JSON shape, table.
#include <gtest/gtest.h>

#include <cmath>

#include "busy_time.hpp"
#include "expertlink/reference.hpp"
#include "expertlink/workload.hpp"
#include "options.hpp"
#include "report.hpp"
#include "workloads.hpp"

namespace eb = expertlink::bench;
using expertlink::workload::Routing;

TEST(BenchWorkloads, OpNamesRoundTripAndFamilies) {
  for (eb::Op op : eb::kAllOps) {
    ASSERT_TRUE(eb::op_from_name(eb::op_name(op)).has_value());
    EXPECT_EQ(*eb::op_from_name(eb::op_name(op)), op);
  }
  EXPECT_FALSE(eb::op_from_name("ht_dispatch").has_value());
  EXPECT_EQ(eb::op_family(eb::Op::kHtCombineBf16), eb::Family::kHt);
  EXPECT_EQ(eb::op_family(eb::Op::kLlRoundtrip), eb::Family::kLl);
  EXPECT_TRUE(eb::op_has_dispatch(eb::Op::kLlRoundtrip) && eb::op_has_combine(eb::Op::kLlRoundtrip));
  EXPECT_FALSE(eb::op_has_combine(eb::Op::kHtDispatchFp8));
  EXPECT_FALSE(eb::op_has_dispatch(eb::Op::kHtCombineBf16));
}

TEST(BenchWorkloads, RowBytesOfTheWorkloadsShapes) {
  EXPECT_EQ(eb::fp8_row_bytes(7168), 7168 + 224);
  EXPECT_EQ(eb::bf16_row_bytes(7168), 14336);
  EXPECT_EQ(eb::ll_dispatch_row_bytes(7168), 7408);
}

TEST(BenchWorkloads, ShapesAndSweepsScaleLlMaskedSlots) {
  EXPECT_EQ(eb::family_shape(eb::Family::kHt, 4096).tokens, 4096);
  EXPECT_EQ(eb::family_shape(eb::Family::kLl, 128).masked_slots, 10);
  EXPECT_EQ(eb::family_shape(eb::Family::kLl, 256).masked_slots, 20);
  EXPECT_EQ(eb::family_shape(eb::Family::kLl, 1).masked_slots, 0);
  EXPECT_EQ(eb::family_shape(eb::Family::kLl, 64).masked_slots, 5);
  EXPECT_EQ(eb::sweep_tokens(eb::Family::kHt), (std::vector<int64_t>{256, 512, 1024, 2048, 4096, 8192}));
  EXPECT_EQ(eb::sweep_tokens(eb::Family::kLl).front(), 1);
  EXPECT_EQ(eb::sweep_tokens(eb::Family::kLl).back(), 256);
  EXPECT_EQ(eb::sweep_tokens(eb::Family::kLl).size(), 9u);
}

namespace {

// 2 ranks, 4 experts (2 per rank), top-2, 3 tokens each.
eb::Routings two_rank_routings() {
  eb::Routings rt;
  rt.num_ranks = 2;
  rt.tokens = 3;
  rt.topk = 2;
  rt.num_experts = 4;
  rt.topk_all = {
      {0, 1, /**/ 0, 2, /**/ 3, -1},    // rank 0: token0 -> r0 twice; token1 -> r0, r1; token2 -> r1
      {2, 3, /**/ 1, -1, /**/ -1, -1},  // rank 1: token0 -> r1 twice; token1 -> r0; token2 -> nothing
  };
  return rt;
}

}  // namespace

TEST(BenchWorkloads, HtTrafficCountsEachTokenOncePerDestinationRank) {
  eb::Traffic tr = eb::count_traffic(eb::Family::kHt, two_rank_routings());
  EXPECT_EQ(tr.at(0, 0), 2);  // tokens 0 and 1
  EXPECT_EQ(tr.at(0, 1), 2);  // tokens 1 and 2
  EXPECT_EQ(tr.at(1, 0), 1);  // token 1
  EXPECT_EQ(tr.at(1, 1), 1);  // token 0
  EXPECT_EQ(tr.received(0), 3);
  EXPECT_EQ(tr.received_remote(0), 1);
  EXPECT_EQ(tr.sent_remote(0), 2);
}

TEST(BenchWorkloads, LlTrafficCountsValidSelections) {
  eb::Traffic tr = eb::count_traffic(eb::Family::kLl, two_rank_routings());
  EXPECT_EQ(tr.at(0, 0), 3);
  EXPECT_EQ(tr.at(0, 1), 2);
  EXPECT_EQ(tr.at(1, 0), 1);
  EXPECT_EQ(tr.at(1, 1), 2);
  EXPECT_EQ(tr.sent(0), 5);
  EXPECT_EQ(tr.sent(1), 3);
}

TEST(BenchWorkloads, ReceivedRowsAreBySourceRankThenTokenThenSlot) {
  auto ht = eb::received_rows(eb::Family::kHt, two_rank_routings(), 1);
  ASSERT_EQ(ht.size(), 3u);
  EXPECT_EQ(ht[0].src_rank, 0);
  EXPECT_EQ(ht[0].token, 1);
  EXPECT_EQ(ht[0].slot, -1);
  EXPECT_EQ(ht[1].token, 2);
  EXPECT_EQ(ht[2].src_rank, 1);
  EXPECT_EQ(ht[2].token, 0);

  auto ll = eb::received_rows(eb::Family::kLl, two_rank_routings(), 0);
  ASSERT_EQ(ll.size(), 4u);
  EXPECT_EQ((std::vector<int>{ll[0].token, ll[0].slot, ll[0].expert}), (std::vector<int>{0, 0, 0}));
  EXPECT_EQ((std::vector<int>{ll[1].token, ll[1].slot, ll[1].expert}), (std::vector<int>{0, 1, 1}));
  EXPECT_EQ((std::vector<int>{ll[2].token, ll[2].slot, ll[2].expert}), (std::vector<int>{1, 0, 0}));
  EXPECT_EQ((std::vector<int>{ll[3].src_rank, ll[3].token, ll[3].slot, ll[3].expert}),
            (std::vector<int>{1, 1, 0, 1}));
}

TEST(BenchWorkloads, HtBytesCountRowsReceivedByTheBusiestRank) {
  eb::Traffic tr = eb::count_traffic(eb::Family::kHt, two_rank_routings());
  const int64_t h = 7168;
  eb::OpBytes fp8 = eb::op_bytes(eb::Op::kHtDispatchFp8, tr, h);
  EXPECT_EQ(fp8.per_rank, (std::vector<int64_t>{3 * 7392, 3 * 7392}));
  EXPECT_EQ(fp8.bytes, 3 * 7392);
  // Remote: rank 0 receives 1 and sends 2; rank 1 receives 2 and sends 1: max is 2 rows.
  EXPECT_EQ(fp8.remote_bytes, 2 * 7392);
  eb::OpBytes combine = eb::op_bytes(eb::Op::kHtCombineBf16, tr, h);
  EXPECT_EQ(combine.bytes, 3 * 14336);
  EXPECT_EQ(combine.remote_bytes, 2 * 14336);
}

TEST(BenchWorkloads, LlBytesCountSelectionsSentAndRoundtripAddsBothPhases) {
  eb::Traffic tr = eb::count_traffic(eb::Family::kLl, two_rank_routings());
  const int64_t h = 7168;
  eb::OpBytes d = eb::op_bytes(eb::Op::kLlDispatchFp8, tr, h);
  EXPECT_EQ(d.per_rank, (std::vector<int64_t>{5 * 7408, 3 * 7408}));
  EXPECT_EQ(d.bytes, 5 * 7408);
  EXPECT_EQ(d.remote_bytes, 2 * 7408);  // rank 0 sends 2 remote; rank 1 receives 2 remote
  eb::OpBytes c = eb::op_bytes(eb::Op::kLlCombineBf16, tr, h);
  EXPECT_EQ(c.bytes, 5 * 14336);
  eb::OpBytes rt = eb::op_bytes(eb::Op::kLlRoundtrip, tr, h);
  EXPECT_EQ(rt.bytes, 5 * (7408 + 14336));
  EXPECT_EQ(rt.remote_bytes, 2 * 7408 + 2 * 14336);
}

TEST(BenchWorkloads, GbpsAndFloor) {
  EXPECT_DOUBLE_EQ(eb::gbps(394'000'000, 1000.0), 394.0);  // 394 MB in 1 ms
  auto f = eb::floor_us(394'000'000, 394.0);
  ASSERT_TRUE(f.has_value());
  EXPECT_DOUBLE_EQ(*f, 1000.0);
  EXPECT_FALSE(eb::floor_us(100, std::nullopt).has_value());
  EXPECT_FALSE(eb::floor_us(100, 0.0).has_value());
  EXPECT_DOUBLE_EQ(eb::gbps(100, 0.0), 0.0);
}

TEST(BenchWorkloads, MedianOfOddAndEvenCounts) {
  EXPECT_DOUBLE_EQ(eb::median({5, 1, 3}), 3);
  EXPECT_DOUBLE_EQ(eb::median({4, 1, 3, 2}), 2.5);
  EXPECT_DOUBLE_EQ(eb::median({}), 0);
}

TEST(BenchWorkloads, Bf16RoundsToNearestEven) {
  EXPECT_EQ(eb::float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(eb::float_to_bf16(1.0f + 1.0f / 256.0f), 0x3f80);  // tie -> even
  EXPECT_EQ(eb::float_to_bf16(1.0f + 3.0f / 256.0f), 0x3f82);  // tie -> even (up)
  EXPECT_FLOAT_EQ(eb::bf16_to_float(0xc000), -2.0f);
  EXPECT_FLOAT_EQ(eb::expert_output_factor(eb::Family::kHt, 5, 99), 2.0f);
  EXPECT_FLOAT_EQ(eb::expert_output_factor(eb::Family::kLl, 5, 7), 4.0f);
}

namespace {

int parse(std::vector<const char*> args, eb::Options& o, const char* commit_env = nullptr) {
  args.insert(args.begin(), "el_bench");
  return eb::parse_options(static_cast<int>(args.size()), args.data(), commit_env, o);
}

}  // namespace

TEST(BenchOptions, DefaultsRunEverythingRecorded) {
  eb::Options o;
  ASSERT_EQ(parse({}, o), -1);
  EXPECT_EQ(o.iters, 50);
  EXPECT_EQ(o.ops.size(), std::size(eb::kAllOps));
  EXPECT_EQ(o.routings, (std::vector<Routing>{Routing::kUniform, Routing::kSkewed}));
  EXPECT_EQ(o.commit, "unknown");
  EXPECT_EQ(o.out, eb::kDefaultOutDir);
  EXPECT_FALSE(o.seed_given);
  EXPECT_TRUE(o.recorded());
  EXPECT_EQ(eb::token_list(o, eb::Family::kHt), (std::vector<int64_t>{4096}));
  EXPECT_EQ(eb::token_list(o, eb::Family::kLl), (std::vector<int64_t>{128}));
}

TEST(BenchOptions, SubsetsCommitSeedAndSweep) {
  eb::Options o;
  ASSERT_EQ(parse({"--workloads", "ht_dispatch_fp8,ll", "--routing", "skewed", "--seed", "7", "--sweep",
                   "--gpus", "2", "--out", "/tmp/x"},
                  o, "abc1234"),
            -1);
  EXPECT_EQ(o.ops, (std::vector<eb::Op>{eb::Op::kHtDispatchFp8, eb::Op::kLlDispatchFp8,
                                        eb::Op::kLlCombineBf16, eb::Op::kLlRoundtrip}));
  EXPECT_EQ(o.routings, (std::vector<Routing>{Routing::kSkewed}));
  EXPECT_TRUE(o.seed_given);
  EXPECT_EQ(o.seed, 7u);
  EXPECT_EQ(o.gpus, 2);
  EXPECT_EQ(o.commit, "abc1234");
  EXPECT_EQ(o.out, "/tmp/x");
  EXPECT_EQ(eb::token_list(o, eb::Family::kHt).size(), 6u);
}

TEST(BenchOptions, QuickIsNotRecordedAndFewIterationsAreNot) {
  eb::Options q;
  ASSERT_EQ(parse({"--quick"}, q), -1);
  EXPECT_EQ(q.iters, 10);
  EXPECT_EQ(q.routings, (std::vector<Routing>{Routing::kUniform}));
  EXPECT_FALSE(q.recorded());
  eb::Options few;
  ASSERT_EQ(parse({"--iters", "49", "--commit", "zz"}, few, "abc"), -1);
  EXPECT_FALSE(few.recorded());
  EXPECT_EQ(few.commit, "zz");
}

TEST(BenchOptions, OnlyTheWritingL2FlushIsRecorded) {
  eb::Options d;
  ASSERT_EQ(parse({}, d), -1);
  EXPECT_EQ(d.l2_flush, "write");
  for (const char* mode : {"read", "off"}) {
    eb::Options o;
    ASSERT_EQ(parse({"--l2-flush", mode}, o), -1) << mode;
    EXPECT_EQ(o.l2_flush, mode);
    EXPECT_FALSE(o.recorded()) << mode;
  }
  eb::Options bad;
  EXPECT_NE(parse({"--l2-flush", "none"}, bad), -1);
}

TEST(BenchOptions, SmCountsAndLibraries) {
  eb::Options d;
  ASSERT_EQ(parse({}, d), -1);
  EXPECT_EQ(d.sms, (std::vector<int>{24, 8}));
  eb::Options o;
  ASSERT_EQ(parse({"--sms", "16,4,16", "--libraries", "nccl,expertlink"}, o), -1);
  EXPECT_EQ(o.sms, (std::vector<int>{16, 4}));  // repeats dropped, order kept
  EXPECT_EQ(o.libraries, (std::vector<std::string>{"nccl", "expertlink"}));
  eb::Options one;
  ASSERT_EQ(parse({"--sms", "32"}, one), -1);
  EXPECT_EQ(one.sms, (std::vector<int>{32}));
  eb::Options bad;
  testing::internal::CaptureStderr();
  testing::internal::CaptureStdout();
  EXPECT_GT(parse({"--sms", "0"}, bad), 0);
  EXPECT_GT(parse({"--libraries", "deepep"}, bad), 0);
  testing::internal::GetCapturedStdout();
  testing::internal::GetCapturedStderr();
}

TEST(BenchOptions, RejectsUnknownWorkloadAndRouting) {
  eb::Options o;
  testing::internal::CaptureStderr();
  testing::internal::CaptureStdout();
  EXPECT_GT(parse({"--workloads", "ht_dispatch"}, o), 0);
  EXPECT_GT(parse({"--routing", "zipf"}, o), 0);
  EXPECT_GT(parse({"--gpus", "0"}, o), 0);
  EXPECT_EQ(parse({"--help"}, o), 0);
  testing::internal::GetCapturedStdout();
  testing::internal::GetCapturedStderr();
}

namespace {

eb::Record sample_record(const char* library, double us) {
  eb::Record r;
  r.workload = "ht_dispatch_fp8";
  r.library = library;
  r.routing = "uniform";
  r.tokens = 4096;
  r.us = us;
  r.gbps = 232.0;
  r.floor_us = 80.1;
  if (std::string(library) != "nccl") {
    r.sms = 24;
    r.buffer_bytes = 512 << 20;
  }
  r.rank_us = {us - 1, us};
  r.verified = true;
  return r;
}

}  // namespace

TEST(BenchReport, JsonHasTheWorkloadsShape) {
  eb::RunInfo info;
  info.card = "NVIDIA H200";
  info.gpus = 2;
  info.driver = "580.159.04";
  info.commit = "abc1234";
  info.date = "2026-11-28";
  info.peer_copy_gbps = 394.3;
  std::vector<eb::Record> recs = {sample_record("nccl", 260.0), sample_record("expertlink", 118.2)};
  nlohmann::json j = eb::make_report(info, recs);
  for (const char* key :
       {"card", "gpus", "driver", "commit", "date", "peer_copy_gbps", "d2d_copy_gbps", "records"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_TRUE(j["d2d_copy_gbps"].is_null());
  EXPECT_EQ(j["gpus"], 2);
  const auto& n = j["records"][0];
  for (const char* key :
       {"workload", "library", "us", "gbps", "floor_us", "sms", "routing", "tokens", "buffer_bytes"})
    EXPECT_TRUE(n.contains(key)) << key;
  EXPECT_TRUE(n["sms"].is_null());
  EXPECT_TRUE(n["buffer_bytes"].is_null());
  EXPECT_EQ(j["records"][1]["sms"], 24);
  eb::Record back = eb::record_from_json(j["records"][1]);
  EXPECT_EQ(back.library, "expertlink");
  EXPECT_EQ(back.sms, 24);
  EXPECT_EQ(back.buffer_bytes, 512 << 20);
  EXPECT_DOUBLE_EQ(back.us, 118.2);
  EXPECT_EQ(back.rank_us.size(), 2u);
}

TEST(BenchReport, FileNameDateCardAndCommit) {
  eb::RunInfo info;
  info.card = "NVIDIA H100 80GB HBM3";
  info.gpus = 8;
  info.commit = "e8c93ec";
  info.date = eb::utc_date(0);
  EXPECT_EQ(info.date, "1970-01-01");
  EXPECT_EQ(eb::result_filename(info), "1970-01-01_NVIDIA-H100-80GB-HBM3x8_e8c93ec.json");
  EXPECT_EQ(eb::sanitize_card("a/b c"), "a-b-c");
  EXPECT_EQ(eb::sanitize_card(""), "unknown");
}

TEST(BenchReport, TableShowsBaselineAndSpeedup) {
  std::vector<eb::Record> recs = {sample_record("nccl", 260.0), sample_record("expertlink", 130.0)};
  std::string table = eb::format_table(recs);
  EXPECT_NE(table.find("speedup"), std::string::npos);
  std::string row = eb::format_row(recs, recs[1]);
  EXPECT_NE(row.find("2.00"), std::string::npos) << row;  // 260 / 130
  EXPECT_NE(row.find("1.62"), std::string::npos) << row;  // 130 / 80.1
  EXPECT_NE(row.find(" 24 "), std::string::npos) << row;  // SMs
  std::string nccl_row = eb::format_row(recs, recs[0]);
  EXPECT_NE(nccl_row.find(" - "), std::string::npos) << nccl_row;  // no SMs for NCCL
}

TEST(BenchKernelTime, BusyTimeIsTheUnionOfTheIntervals) {
  using eb::Intervals;
  Intervals none;
  EXPECT_EQ(eb::busy_ns(none), 0u);
  Intervals one = {{100, 250}};
  EXPECT_EQ(eb::busy_ns(one), 150u);
  // Out of order, one nested, two overlapping (a dependent launch resident early), one apart, one
  // touching the previous end, one empty.
  Intervals many = {{500, 600}, {100, 200}, {120, 180}, {150, 300}, {600, 650}, {1000, 1000}};
  EXPECT_EQ(eb::busy_ns(many), 200u + 150u + 0u);
  Intervals apart = {{0, 10}, {20, 30}, {40, 50}};
  EXPECT_EQ(eb::busy_ns(apart), 30u);
}

TEST(BenchReport, KernelTimeInTheJsonAndTheTable) {
  std::vector<eb::Record> recs = {sample_record("nccl", 260.0), sample_record("expertlink", 130.0)};
  recs[1].kernel_us = 121.4;
  recs[1].rank_kernel_us = {121.4, 119.9};
  const nlohmann::json j = eb::record_to_json(recs[1]);
  EXPECT_DOUBLE_EQ(j["kernel_us"].get<double>(), 121.4);
  EXPECT_TRUE(eb::record_to_json(recs[0])["kernel_us"].is_null());  // not timed that way
  const eb::Record back = eb::record_from_json(j);
  EXPECT_EQ(back.kernel_us, 121.4);
  EXPECT_EQ(back.rank_kernel_us, recs[1].rank_kernel_us);
  EXPECT_FALSE(eb::record_from_json(eb::record_to_json(recs[0])).kernel_us.has_value());
  EXPECT_NE(eb::table_header().find("kernel_us"), std::string::npos);
  const std::string row = eb::format_row(recs, recs[1]);
  EXPECT_NE(row.find(" 121.4 ok"), std::string::npos) << row;
  // The check stays the last column (scripts/gpu_ab.sh reads it as such).
  EXPECT_NE(eb::format_row(recs, recs[0]).find(" - ok"), std::string::npos);
}

TEST(BenchReport, VariantsCompareWithTheirWorkloadsBaseline) {
  std::vector<eb::Record> recs = {sample_record("nccl", 260.0), sample_record("expertlink", 130.0),
                                  sample_record("expertlink", 104.0)};
  recs[2].workload = "ht_dispatch_fp8_exact";
  EXPECT_EQ(eb::baseline_us(recs, recs[1]), 260.0);
  EXPECT_EQ(eb::baseline_us(recs, recs[2]), 260.0);
  std::string row = eb::format_row(recs, recs[2]);
  EXPECT_NE(row.find("2.50"), std::string::npos) << row;  // 260 / 104
  eb::Record other = recs[1];
  other.workload = "ht_dispatch_fp8x";  // not a variant of ht_dispatch_fp8
  EXPECT_FALSE(eb::baseline_us(recs, other).has_value());
  other.workload = "ht_dispatch_bf16_exact";
  EXPECT_FALSE(eb::baseline_us(recs, other).has_value());
}

// The bench's own layout agrees with the oracle's (expertlink/reference.hpp) on generated routings.
TEST(BenchWorkloads, HtLayoutMatchesTheOracleOnGeneratedRoutings) {
  for (Routing routing : {Routing::kUniform, Routing::kSkewed}) {
    for (int ranks : {1, 2, 4, 8}) {
      const expertlink::workload::Shape shape = eb::family_shape(eb::Family::kHt, 256);
      eb::Routings rt;
      rt.num_ranks = ranks;
      rt.tokens = shape.tokens;
      rt.topk = shape.topk;
      rt.num_experts = shape.num_experts;
      for (int r = 0; r < ranks; ++r)
        rt.topk_all.push_back(expertlink::workload::make_topk_idx(shape.tokens, shape.topk, shape.num_experts,
                                                                  ranks, routing, 11, r, shape.masked_slots));
      eb::Traffic tr = eb::count_traffic(eb::Family::kHt, rt);
      std::vector<std::vector<eb::RowId>> expected(static_cast<size_t>(ranks));
      for (int s = 0; s < ranks; ++s) {
        auto layout = expertlink::reference::get_dispatch_layout(rt.topk_all[s], rt.tokens, rt.topk,
                                                                 rt.num_experts, ranks);
        for (int d = 0; d < ranks; ++d) EXPECT_EQ(tr.at(s, d), layout.num_tokens_per_rank[d]);
        for (int64_t t = 0; t < rt.tokens; ++t)
          for (int d = 0; d < ranks; ++d)
            if (layout.is_token_in_rank[static_cast<size_t>(t * ranks + d)])
              expected[static_cast<size_t>(d)].push_back(eb::RowId{s, static_cast<int32_t>(t), -1, -1});
      }
      for (int d = 0; d < ranks; ++d) {
        auto got = eb::received_rows(eb::Family::kHt, rt, d);
        ASSERT_EQ(got.size(), expected[static_cast<size_t>(d)].size());
        for (size_t i = 0; i < got.size(); ++i) {
          ASSERT_EQ(got[i].src_rank, expected[static_cast<size_t>(d)][i].src_rank) << "row " << i;
          ASSERT_EQ(got[i].token, expected[static_cast<size_t>(d)][i].token) << "row " << i;
        }
      }
      if (ranks == 8 && routing == Routing::kSkewed) {  // rank 0 gets about half the picks, not 1/8
        EXPECT_GT(tr.received(0), tr.received(1));
      }
    }
  }
}

TEST(BenchWorkloads, LlLayoutIsExpertMajorBySourceRankThenToken) {
  // Rank 0 holds experts 0 and 1; capacity 4 gives each expert 2 * 4 = 8 slots.
  eb::LlLayout lay = eb::ll_layout(two_rank_routings(), 0, 4);
  EXPECT_EQ(lay.slots_per_expert, 8);
  ASSERT_EQ(lay.ids.size(), 4u);
  EXPECT_EQ(lay.positions, (std::vector<int64_t>{0, 1, 8, 9}));
  // Expert 0: rank 0 tokens 0 and 1. Expert 1: rank 0 token 0 (slot 1), then rank 1 token 1 (slot 0).
  EXPECT_EQ((std::vector<int>{lay.ids[0].src_rank, lay.ids[0].token, lay.ids[0].slot, lay.ids[0].expert}),
            (std::vector<int>{0, 0, 0, 0}));
  EXPECT_EQ((std::vector<int>{lay.ids[1].src_rank, lay.ids[1].token, lay.ids[1].slot, lay.ids[1].expert}),
            (std::vector<int>{0, 1, 0, 0}));
  EXPECT_EQ((std::vector<int>{lay.ids[2].src_rank, lay.ids[2].token, lay.ids[2].slot, lay.ids[2].expert}),
            (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ((std::vector<int>{lay.ids[3].src_rank, lay.ids[3].token, lay.ids[3].slot, lay.ids[3].expert}),
            (std::vector<int>{1, 1, 0, 1}));
  EXPECT_EQ(lay.recv_count, (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(lay.range_begin, (std::vector<int32_t>{0, 2, 0, 1}));
  EXPECT_EQ(lay.range_count, (std::vector<int32_t>{2, 0, 1, 1}));
  // Rank 1 (experts 2, 3): expert 2 gets rank 0 token 1 and rank 1 token 0; expert 3 rank 0 token 2 and
  // rank 1 token 0.
  eb::LlLayout lay1 = eb::ll_layout(two_rank_routings(), 1, 4);
  EXPECT_EQ(lay1.positions, (std::vector<int64_t>{0, 1, 8, 9}));
  EXPECT_EQ(lay1.recv_count, (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(eb::ll_capacity(1), 128);
  EXPECT_EQ(eb::ll_capacity(128), 128);
  EXPECT_EQ(eb::ll_capacity(256), 256);
}

// ExpertLink's LL implementation is checked against this layout: it must be the oracle's.
TEST(BenchWorkloads, LlLayoutMatchesTheOracleOnGeneratedRoutings) {
  namespace ref = expertlink::reference;
  for (Routing routing : {Routing::kUniform, Routing::kSkewed}) {
    for (int ranks : {1, 2, 4, 8}) {
      const expertlink::workload::Shape shape = eb::family_shape(eb::Family::kLl, 128);
      const int64_t hidden = 128, capacity = eb::ll_capacity(shape.tokens);  // any hidden: layout only
      eb::Routings rt;
      rt.num_ranks = ranks;
      rt.tokens = shape.tokens;
      rt.topk = shape.topk;
      rt.num_experts = shape.num_experts;
      std::vector<ref::LlDispatchInput> inputs;
      for (int r = 0; r < ranks; ++r) {
        rt.topk_all.push_back(expertlink::workload::make_topk_idx(shape.tokens, shape.topk, shape.num_experts,
                                                                  ranks, routing, 5, r, shape.masked_slots));
        ref::LlDispatchInput in;
        in.num_tokens = shape.tokens;
        in.x = expertlink::workload::make_bf16(static_cast<size_t>(shape.tokens * hidden), 5, r);
        in.topk_idx = rt.topk_all.back();
        inputs.push_back(std::move(in));
      }
      ref::LlDispatchParams params;
      params.num_experts = shape.num_experts;
      params.hidden = hidden;
      params.topk = shape.topk;
      params.num_max_dispatch_tokens_per_rank = capacity;
      params.use_fp8 = false;
      const std::vector<ref::LlDispatchOutput> out = ref::ll_dispatch(params, inputs);
      for (int d = 0; d < ranks; ++d) {
        const ref::LlHandle& h = out[static_cast<size_t>(d)].handle;
        const eb::LlLayout lay = eb::ll_layout(rt, d, capacity);
        EXPECT_EQ(lay.slots_per_expert, h.slots_per_expert());
        EXPECT_EQ(lay.recv_count, h.recv_count);
        EXPECT_EQ(lay.range_begin, h.range_begin);
        EXPECT_EQ(lay.range_count, h.range_count);
        size_t valid = 0;
        for (int32_t s : h.src_rank) valid += s >= 0 ? 1 : 0;
        ASSERT_EQ(lay.ids.size(), valid);
        for (size_t i = 0; i < lay.ids.size(); ++i) {
          const size_t p = static_cast<size_t>(lay.positions[i]);
          ASSERT_EQ(lay.ids[i].src_rank, h.src_rank[p]) << "rank " << d << " row " << i;
          ASSERT_EQ(lay.ids[i].token, h.src_token[p]) << "rank " << d << " row " << i;
          ASSERT_EQ(lay.ids[i].expert / (shape.num_experts / ranks), d);
          ASSERT_EQ(static_cast<int64_t>(p) / lay.slots_per_expert,
                    lay.ids[i].expert % (shape.num_experts / ranks));
        }
      }
    }
  }
}
