// Internode HT on one host: each rank sets its own NCCL_HOSTID before creating its communicator, so NCCL
// (and ExpertLink's topology) sees several nodes and carries the "network" hop over its NET transport
// (P2P and SHM, which need one host, are off too). Dispatch is checked bitwise against the CPU oracle;
// combine bitwise where every node holds one GPU (the oracle's summation order then holds exactly), else
// within the oracle's tolerance. A second case checks that a single node keeps the intranode path.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "emulated_nodes.hpp"
#include "expertlink/buffer.hpp"
#include "expertlink/workload.hpp"
#include "harness.hpp"
#include "ht_check.hpp"

namespace expertlink::test {
namespace {

using htt::Fmt;
using htt::HtCase;
using workload::Routing;

// Internode rounds: token counts differ within a node too (rank r has tokens + (r % 3) * 5); combine is
// bitwise only where every node holds one GPU (the oracle's summation order then holds exactly).
HtCase internode_case(HtCase c, bool combine_bitwise) {
  c.uneven_period = 3;
  c.uneven_step = 5;
  c.combine_bitwise = combine_bitwise;
  return c;
}

// One notify + dispatch + cached dispatch + combine round on `buffer` with a fresh handle, checked by
// htt::run_round against the oracle.
int run_round(const RankContext& ctx, Buffer& buffer, const HtCase& c, uint64_t seed, cudaStream_t stream) {
  HtHandle handle;
  htt::RoundStats st;
  if (int rc = htt::run_round(ctx, c, buffer, handle, seed, stream, /*also_cached=*/true, &st); rc != 0)
    return rc;
  std::printf("[rank %d] %-34s T=%lld N=%lld: dispatch bitwise, combine %s (%lld inexact of %lld)\n",
              ctx.rank, c.name, (long long)st.tokens, (long long)st.num_recv,
              st.combine_inexact == 0 ? "bitwise" : "within tolerance", (long long)st.combine_inexact,
              (long long)st.tokens * c.hidden);
  return 0;
}

}  // namespace

// 2 nodes (R / 2 GPUs each; 1 with two GPUs): dispatch+combine vs the oracle, BF16 and FP8 (float and
// UE8M0 scales), random routing with -1 slots, an empty rank, i32 ids, skewed routing, capacity sizing,
// and the HT hidden size.
GPU_CASE(internode_2nodes_x1_bf16_fp8_exact, 2, 240) {
  const int R = ctx.num_ranks;
  GPU_EXPECT(R % 2 == 0, "needs an even number of ranks, got %d", R);
  const int local = R / 2;
  emulate_nodes(ctx.rank, local);
  Communicator comm(ctx.id, ctx.rank, R, ctx.device);
  const int64_t max_tokens = 1100;
  Buffer buffer(comm, Buffer::ht_size_hint(R, max_tokens, 7168, 8));
  GPU_EXPECT(buffer.num_nodes() == 2 && buffer.num_local_ranks() == local,
             "topology: %d nodes x %d local ranks, expected 2 x %d (NCCL_HOSTID per rank)",
             buffer.num_nodes(), buffer.num_local_ranks(), local);
  GPU_EXPECT(buffer.window_bytes() == 0, "the internode path holds no symmetric window, got %zu bytes",
             buffer.window_bytes());
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  const uint64_t seed = run_seed(ctx.id);
  const bool bitwise = local == 1;
  HtCase empty_rank1{"bf16_skewed_empty_rank1", 200, 1024, 8, 32 * R, Fmt::kBf16, false,
                     Routing::kSkewed,          20};
  empty_rank1.zero_tokens_rank = 1;
  HtCase capacity{"fp8_capacity_aligned", 180, 2048, 6, 12 * R, Fmt::kFp8, false, Routing::kUniform, 10};
  capacity.sizing = Sizing::kCapacity;
  capacity.expert_alignment = 4;
  const HtCase cases[] = {
      {"bf16_uniform_masked", 300, 2048, 8, 16 * R, Fmt::kBf16, false, Routing::kUniform, 60},
      {"fp8_f32_scales_masked", 300, 2048, 8, 16 * R, Fmt::kFp8, false, Routing::kUniform, 60},
      {"fp8_ue8m0_i32_ids", 257, 1024, 4, 8 * R, Fmt::kFp8Ue8m0, true, Routing::kUniform, 30},
      empty_rank1,
      capacity,
      {"bf16_topk1_all_masked_rank0", 64, 512, 1, 2 * R, Fmt::kBf16, false, Routing::kUniform, 64 + 5},
      {"fp8_ht_hidden_7168", 1024, 7168, 8, 128 * R, Fmt::kFp8, false, Routing::kUniform, 0},
      {"bf16_ht_hidden_7168", 1024, 7168, 8, 128 * R, Fmt::kBf16, false, Routing::kUniform, 0},
  };
  int round = 0;
  for (const HtCase& c : cases)
    if (int rc = run_round(ctx, buffer, internode_case(c, bitwise), seed + 1000 * round++, stream); rc != 0)
      return rc;
  // The same buffer and handle machinery again, after everything (staging reused, no growth needed).
  if (int rc = run_round(ctx, buffer, internode_case(cases[0], bitwise), seed + 77, stream); rc != 0)
    return rc;
  std::printf("[rank %d] internode: %d nodes x %d, staging %zu bytes\n", ctx.rank, buffer.num_nodes(),
              buffer.num_local_ranks(), buffer.internode_staging_bytes());
  cudaStreamDestroy(stream);
  return 0;
}

// One node (no NCCL_HOSTID difference): the intranode path, its symmetric window, unchanged results.
GPU_CASE(internode_single_node_takes_intranode_path, 2, 120) {
  unsetenv("NCCL_HOSTID");
  Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  Buffer buffer(comm, Buffer::ht_size_hint(ctx.num_ranks, 400, 2048, 8));
  GPU_EXPECT(buffer.num_nodes() == 1 && buffer.num_local_ranks() == ctx.num_ranks,
             "topology: %d nodes x %d local ranks, expected 1 x %d", buffer.num_nodes(),
             buffer.num_local_ranks(), ctx.num_ranks);
  GPU_EXPECT(buffer.window_bytes() > 0, "the intranode path must hold a symmetric window");
  GPU_EXPECT(buffer.internode_staging_bytes() == 0, "no internode staging expected, got %zu",
             buffer.internode_staging_bytes());
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  // The intranode kernels sum in the oracle's order: bitwise.
  const HtCase c = internode_case(
      {"intranode_bf16_masked", 300, 2048, 8, 16 * ctx.num_ranks, Fmt::kBf16, false, Routing::kUniform, 40},
      /*combine_bitwise=*/true);
  if (int rc = run_round(ctx, buffer, c, run_seed(ctx.id), stream); rc != 0) return rc;
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace expertlink::test
