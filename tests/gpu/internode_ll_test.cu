// Internode LL on one host: the ranks are split into 2 emulated nodes (emulated_nodes.hpp: NCCL_HOSTID
// per node, NCCL's socket NET transport between them), so Buffer takes the internode LL path (fixed-size
// pairs over grouped ncclSend/ncclRecv; docs/internode.md). Checked with the intranode LL machinery
// (ll_check.hpp): dispatch bitwise against the oracle, in the oracle's (deterministic) order, per
// (source rank, token) after canonicalisation; combine within the oracle's tolerance. Outputs are
// poisoned before every call (LlIo::load).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "emulated_nodes.hpp"
#include "ht_check.hpp"
#include "ll_check.hpp"

namespace expertlink::test {
namespace {

using llt::LlCase;
using llt::LlIo;
using llt::LlRound;

// A buffer over 2 emulated nodes (R / 2 ranks each). Construct first thing in a case: the node claim
// must precede NCCL's initialisation.
struct NodeClaim {
  explicit NodeClaim(const RankContext& ctx) { emulate_nodes(ctx.rank, ctx.num_ranks / 2); }
};

struct NodeEnv {
  NodeClaim claim;  // first: before the communicator
  Communicator comm;
  Buffer buffer;
  cudaStream_t stream = nullptr;
  uint64_t seed;
  NodeEnv(const RankContext& ctx, size_t ht_bytes, size_t ll_bytes)
      : claim(ctx),
        comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device),
        buffer(comm, ht_bytes, ll_bytes),
        seed(run_seed(ctx.id)) {
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (ctx.rank == 0)
      std::printf("seed %llu, %d nodes x %d, LL staging %zu bytes\n", static_cast<unsigned long long>(seed),
                  buffer.num_nodes(), buffer.num_local_ranks(), buffer.internode_staging_bytes());
  }
  ~NodeEnv() { cudaStreamDestroy(stream); }
};

// The topology the cases rely on: 2 nodes, no window, LL staging of both directions.
int check_env(const RankContext& ctx, const NodeEnv& env) {
  GPU_EXPECT(ctx.num_ranks % 2 == 0, "needs an even number of ranks, got %d", ctx.num_ranks);
  GPU_EXPECT(env.buffer.num_nodes() == 2 && env.buffer.num_local_ranks() == ctx.num_ranks / 2,
             "topology: %d nodes x %d local ranks, expected 2 x %d (NCCL_HOSTID per node)",
             env.buffer.num_nodes(), env.buffer.num_local_ranks(), ctx.num_ranks / 2);
  GPU_EXPECT(env.buffer.window_bytes() == 0, "the internode path holds no symmetric window, got %zu bytes",
             env.buffer.window_bytes());
  GPU_EXPECT(env.buffer.internode_staging_bytes() >= 2 * env.buffer.ll_bytes(),
             "LL staging: expected at least 2 x ll_bytes = %zu, got %zu", 2 * env.buffer.ll_bytes(),
             env.buffer.internode_staging_bytes());
  return 0;
}

// Every case, `rounds` fused dispatch + combine rounds on one buffer (T = N on every rank).
int run_cases(const RankContext& ctx, std::initializer_list<LlCase> cases, int rounds) {
  NodeEnv env(ctx, 0, llt::ll_bytes_for(cases, ctx.num_ranks));
  if (check_env(ctx, env) != 0) return 1;
  for (const LlCase& c : cases) {
    LlIo io(c, ctx.num_ranks, ctx.rank);
    for (int i = 0; i < rounds; ++i) {
      const uint64_t seed = env.seed + 1000 * i + 17 * (&c - cases.begin());
      if (llt::run_fused(ctx, env.buffer, env.stream, io,
                         llt::make_round(c, ctx.num_ranks, seed, llt::full_tokens(c, ctx.num_ranks)),
                         seed + 5) != 0)
        return 1;
    }
    if (ctx.rank == 0) std::printf("ok: %s (%d rounds)\n", c.name, rounds);
  }
  return 0;
}

}  // namespace

// FP8 with float scales, rounded scales (i32 ids, row-major scales, i32 ranges) and UE8M0 (also a partial
// scale word), at the DeepSeek decode shape and others; 10 random -1 slots per rank by default.
GPU_CASE(internode_ll_fp8_scale_formats_match_oracle, 2, 300) {
  const int R = ctx.num_ranks;
  LlCase f32{"fp8 f32 scales N=T=128 H=7168 top-8", 128, 7168, 8, 36 * R};
  LlCase round{"fp8 round_scale H=7168 i32 ids, row-major scales, i32 ranges",
               64,
               7168,
               8,
               36 * R,
               true,
               true,
               false,
               true};
  round.range_i32 = true;
  round.row_major_scales = true;
  LlCase ue8m0{"fp8 ue8m0 N=T=128 H=7168 top-8", 128, 7168, 8, 36 * R, true, true, true};
  LlCase partial{"fp8 ue8m0 H=2176 (partial scale word) top-6", 48, 2176, 6, 8 * R, true, true, true};
  LlCase skewed{"fp8 H=128 top-1, skewed", 16, 128, 1, R};
  skewed.routing = workload::Routing::kSkewed;
  skewed.masked_slots = 3;
  return run_cases(ctx, {f32, round, ue8m0, partial, skewed}, 2);
}

GPU_CASE(internode_ll_bf16_hidden_2880_and_7168_match_oracle, 2, 300) {
  const int R = ctx.num_ranks;
  return run_cases(ctx,
                   {{"bf16 H=2880 top-4", 64, 2880, 4, 8 * R, false},
                    {"bf16 N=T=128 H=7168 top-8", 128, 7168, 8, 36 * R, false}},
                   2);
}

// T from 0 to N on each rank (every rank's count in every message), repeated experts, many -1 slots, and
// every slot -1 (nothing moves, combine gives zeros).
GPU_CASE(internode_ll_tokens_0_to_n_masked_and_duplicates, 2, 300) {
  const int R = ctx.num_ranks;
  LlCase c{"fp8 N=64 H=1024 top-8, repeated experts, 100 masked", 64, 1024, 8, 16 * R};
  c.duplicates = true;
  c.masked_slots = 100;
  LlCase all_masked{"bf16 N=16 H=512 top-4, every slot -1", 16, 512, 4, 8 * R, false};
  all_masked.masked_slots = 16 * 4;
  NodeEnv env(ctx, 0, llt::ll_bytes_for({c, all_masked}, R));
  if (check_env(ctx, env) != 0) return 1;
  LlIo io(c, R, ctx.rank);
  const int patterns[][2] = {{0, 64}, {64, 0}, {1, 17}, {64, 64}, {33, 1}, {0, 0}, {63, 2}};
  int i = 0;
  for (const auto& pat : patterns) {
    std::vector<int> tokens(R);
    for (int s = 0; s < R; ++s) tokens[s] = pat[s % 2];
    const uint64_t seed = env.seed + 31 * ++i;
    if (llt::run_fused(ctx, env.buffer, env.stream, io, llt::make_round(c, R, seed, tokens), seed + 5) != 0)
      return 1;
    if (ctx.rank == 0) std::printf("ok: %s, T = (%d, %d)\n", c.name, pat[0], pat[1]);
  }
  LlIo io2(all_masked, R, ctx.rank);
  if (llt::run_fused(ctx, env.buffer, env.stream, io2,
                     llt::make_round(all_masked, R, env.seed + 7, llt::full_tokens(all_masked, R)),
                     env.seed + 8) != 0)
    return 1;
  if (ctx.rank == 0) std::printf("ok: %s\n", all_masked.name);
  return 0;
}

// Split calls: two dispatches in flight (separate staging per parity), a third refused before anything is
// enqueued, a combine along a pending handle refused, a hook called twice refused; the combines' hooks in
// the other order; a split dispatch beside a fused one; hooks on a second stream.
GPU_CASE(internode_ll_hook_two_in_flight_third_rejected, 2, 300) {
  const int R = ctx.num_ranks;
  LlCase c{"fp8 N=32 H=2048 top-8", 32, 2048, 8, 16 * R};
  NodeEnv env(ctx, 0, llt::ll_bytes_for({c}, R));
  if (check_env(ctx, env) != 0) return 1;
  Buffer& buf = env.buffer;
  cudaStream_t st = env.stream;
  if (llt::run_hook_rounds(ctx, buf, st, c, env.seed, 3) != 0) return 1;
  // Hooks on a second stream (ordered after the call's stream by an event, as the caller must); each
  // round's calls are issued on the first stream again.
  LlIo a(c, R, ctx.rank);
  cudaStream_t other;
  cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking);
  cudaEvent_t ev;
  cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  for (int round = 0; round < 4; ++round) {
    const uint64_t seed = env.seed + 7000 + 10 * round;
    LlRound r = llt::make_round(c, R, seed, llt::full_tokens(c, R));
    a.load(r, st);
    LlRecvHook h = buf.ll_dispatch(a.dispatch_args(true), a.handle, a.dispatch_outputs(), st);
    cudaEventRecord(ev, st);
    cudaStreamWaitEvent(other, ev, 0);
    h(other);
    cudaEventRecord(ev, other);
    cudaStreamWaitEvent(st, ev, 0);  // the combine reads the handle the hook wrote
    a.fill_expert_outputs(seed + 1, st);
    LlRecvHook hc = buf.ll_combine(a.combine_args(true), a.handle, a.combine_outputs(), st);
    cudaEventRecord(ev, st);
    cudaStreamWaitEvent(other, ev, 0);
    hc(other);
    buf.synchronize(other);
    if (llt::check_dispatch(ctx, a, r) != 0 || llt::check_combine(ctx, a, r, seed + 1) != 0) return 1;
  }
  cudaEventDestroy(ev);
  cudaStreamDestroy(other);
  if (ctx.rank == 0) std::printf("ok: hooks on a second stream\n");
  return 0;
}

GPU_CASE(internode_ll_zero_copy_combine_buffer, 2, 180) {
  const int R = ctx.num_ranks;
  LlCase c{"bf16 N=32 H=4096 top-8", 32, 4096, 8, 16 * R, false};
  NodeEnv env(ctx, 0, llt::ll_bytes_for({c}, R));
  if (check_env(ctx, env) != 0) return 1;
  return llt::run_zero_copy_rounds(ctx, env.buffer, env.stream, c, env.seed);
}

// Dispatch + combine captured in one CUDA graph (the kernels and the grouped NCCL sends/receives), fused
// and split, replayed with fresh inputs; plain calls afterwards still agree.
GPU_CASE(internode_ll_cuda_graph_capture_replays, 2, 300) {
  const int R = ctx.num_ranks;
  LlCase c{"fp8 N=64 H=7168 top-8", 64, 7168, 8, 36 * R};
  NodeEnv env(ctx, 0, llt::ll_bytes_for({c}, R));
  if (check_env(ctx, env) != 0) return 1;
  return llt::run_graph_capture_rounds(ctx, env.buffer, env.stream, c, env.seed);
}

// Many LL rounds on one buffer (fused, split, two in flight; token counts 0..N varying per rank and round),
// with internode HT rounds on the same buffer and communicator in between.
GPU_CASE(internode_ll_rounds_one_buffer_mixed_with_ht, 2, 600) {
  const int R = ctx.num_ranks;
  LlCase a{"fp8 round_scale N=16 H=512 top-4", 16, 512, 4, 8 * R, true, true};
  a.masked_slots = 6;
  LlCase b{"bf16 N=8 H=256 top-3 i32 ids", 8, 256, 3, 4 * R, false};
  b.idx_i32 = true;
  b.masked_slots = 2;
  htt::HtCase ht{"ht bf16 between LL rounds", 40, 512, 4, 8 * R, htt::Fmt::kBf16, false,
                 workload::Routing::kUniform, 5};
  ht.uneven_period = 3;
  ht.uneven_step = 5;
  ht.combine_bitwise = R == 2;  // one GPU per node: the oracle's order exactly
  NodeEnv env(ctx, Buffer::ht_size_hint(R, 64, 512, 4), llt::ll_bytes_for({a, b}, R));
  if (check_env(ctx, env) != 0) return 1;
  Buffer& buf = env.buffer;
  cudaStream_t st = env.stream;
  LlIo a1(a, R, ctx.rank), a2(a, R, ctx.rank), b1(b, R, ctx.rank);
  const int calls = llt::run_mixed_rounds(ctx, buf, st, a1, a2, b1, env.seed, 200, [&](uint64_t seed) {
    HtHandle handle;
    return htt::run_round(ctx, ht, buf, handle, seed, st, /*also_cached=*/false);
  });
  if (calls < 0) return 1;
  if (ctx.rank == 0) std::printf("ok: %d LL calls on one buffer, HT rounds between\n", calls);
  return 0;
}

// Argument errors are refused on every rank before anything is enqueued (the same checks as intranode),
// a buffer too small names ll_bytes and ll_size_hint, an out-of-range expert id is reported by the next
// call; the buffer still works afterwards.
GPU_CASE(internode_ll_rejects_bad_arguments_naming_them, 2, 180) {
  const int R = ctx.num_ranks;
  LlCase c{"fp8 N=8 H=256 top-2", 8, 256, 2, 4 * R};
  NodeEnv env(ctx, 0, llt::ll_bytes_for({c}, R));
  if (check_env(ctx, env) != 0) return 1;
  Buffer& buf = env.buffer;
  cudaStream_t st = env.stream;
  LlIo io(c, R, ctx.rank);
  LlRound r = llt::make_round(c, R, env.seed, llt::full_tokens(c, R));
  io.load(r, st);
  const LlDispatchArgs a = io.dispatch_args(false);
  const LlDispatchOutputs o = io.dispatch_outputs();
  if (llt::expect_common_refusals(ctx, buf, st, io, a, o) != 0) return 1;
  if (llt::expect_late_refusals(ctx, env.comm, buf, st, io, r, a, o) != 0) return 1;
  return llt::run_fused(ctx, buf, st, io, r, env.seed + 1);
}

// The last rank leaves (_exit, no NCCL teardown) before an LL dispatch the others make: no kernel of this
// path waits on a peer, so the survivors' NCCL exchange stalls and their bounded host wait
// (Buffer::synchronize) must end it with kTimeout within 1.5 x timeout + 0.5 s; then they tear down without
// the dead rank (Communicator::abort first).
GPU_CASE(internode_ll_missing_rank_times_out, 2, 90) {
  const int R = ctx.num_ranks, me = ctx.rank, victim = R - 1;
  const NodeClaim claim(ctx);
  RuntimeOptions options;
  if (std::getenv("EXPERTLINK_TIMEOUT_S") == nullptr) options.timeout_s = 1.0;
  LlCase c{"bf16 N=8 H=256 top-2", 8, 256, 2, 4 * R, false};
  auto comm = std::make_unique<Communicator>(ctx.id, me, R, ctx.device);
  auto buffer = std::make_unique<Buffer>(*comm, 0, llt::ll_bytes_for({c}, R), options);
  GPU_EXPECT(buffer->num_nodes() == 2, "topology: %d nodes, expected 2", buffer->num_nodes());
  cudaStream_t st;
  cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
  const uint64_t seed = run_seed(ctx.id);
  LlIo io(c, R, me);
  const LlRound r = llt::make_round(c, R, seed, llt::full_tokens(c, R));
  if (llt::run_fused(ctx, *buffer, st, io, r, seed + 1) != 0) return 1;
  if (me == victim) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    std::printf("[rank %d] leaves before its LL dispatch\n", me);
    std::fflush(stdout);
    _exit(0);
  }
  io.load(r, st);
  const auto t0 = std::chrono::steady_clock::now();
  std::string message = "no error";
  ErrorCode code = ErrorCode::kInternal;
  try {
    buffer->ll_dispatch(io.dispatch_args(false), io.handle, io.dispatch_outputs(), st);
    buffer->synchronize(st);
  } catch (const Error& e) {
    message = e.what();
    code = e.code();
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  comm->abort();
  buffer.reset();
  comm.reset();
  cudaStreamDestroy(st);
  std::printf("FIGURE internode ll: rank %d saw the missing rank after %.3f s (timeout %.1f s): %s\n", me, s,
              options.timeout_s, message.c_str());
  GPU_EXPECT(code == ErrorCode::kTimeout, "a timeout error, got '%s'", message.c_str());
  GPU_EXPECT(s < 1.5 * options.timeout_s + 2.0, "detection within the bounded wait, took %.3f s", s);
  return 0;
}

}  // namespace expertlink::test
