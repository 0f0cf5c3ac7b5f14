// Peer failure (issue 6): the last rank dies in the middle of an operation, while the others' kernels
// already wait for it inside the dispatch (or the combine). Both ranks finish the step before (HT notify,
// or notify + dispatch; LL nothing, or the dispatch) and sync; the survivors launch the next step at once;
// the victim sleeps 300 ms, so that their kernels are spinning on it, and leaves with _exit (no
// destructors, no NCCL teardown: to its peers the same as a kill; a signal death would make the launcher
// fail the case). Each survivor must get Error(kTimeout) naming the victim and the operation within the
// configured timeout ($EXPERTLINK_TIMEOUT_S, else 1 s here), then tear down without waiting for the dead
// rank: Communicator::abort, then the Buffer and the Communicator go. The launcher (tools/multiproc) kills
// and names any rank that hangs, so a hang fails the case instead of blocking the suite.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "ht_check.hpp"
#include "ll_check.hpp"

namespace expertlink::test {
namespace {

using Clock = std::chrono::steady_clock;
using htt::HtCase;
using llt::LlCase;
using llt::LlIo;

enum class Step { kHtDispatch, kHtCombine, kLlDispatch, kLlCombine };

const char* step_name(Step s) {
  switch (s) {
    case Step::kHtDispatch:
      return "HT dispatch";
    case Step::kHtCombine:
      return "HT combine";
    case Step::kLlDispatch:
      return "LL dispatch";
    case Step::kLlCombine:
      return "LL combine";
  }
  return "?";
}

int64_t now_ns() {
  // steady_clock is CLOCK_MONOTONIC: one clock for every process of the host.
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

int peer_killed(const RankContext& ctx, Step step) {
  const int R = ctx.num_ranks, me = ctx.rank, victim = R - 1;
  RuntimeOptions options;
  if (std::getenv("EXPERTLINK_TIMEOUT_S") == nullptr) options.timeout_s = 1.0;
  const double timeout = options.timeout_s;
  const uint64_t seed = run_seed(ctx.id);
  // Where the victim leaves the time of its death for the survivors.
  const std::string death_file = "/tmp/expertlink_victim_" + std::to_string(seed) + ".ns";

  auto comm = std::make_unique<Communicator>(ctx.id, me, R, ctx.device);
  const HtCase hc{"bf16 T=64 H=1024 top-4/16", 64, 1024, 4, 16};
  const LlCase lc{"fp8 N=16 H=1024 top-4/16", 16, 1024, 4, 16};
  auto buffer = std::make_unique<Buffer>(*comm, Buffer::ht_size_hint(R, 67, 1024, 4),
                                         llt::ll_bytes_for({lc}, R), options);
  cudaStream_t st;
  cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
  // A correct round first: the buffer works, and its LL state exists.
  HtHandle handle;
  LlIo io(lc, R, me);
  const llt::LlRound round = llt::make_round(lc, R, seed + 1, llt::full_tokens(lc, R));
  if (htt::run_round(ctx, hc, *buffer, handle, seed, st, false) != 0) return 1;
  if (llt::run_fused(ctx, *buffer, st, io, round, seed + 2) != 0) return 1;

  // The step before the one the victim misses, on every rank.
  const int T = htt::tokens_of(hc, me), H = hc.hidden, K = hc.topk;
  const auto idx_host =
      workload::make_topk_idx(T, K, hc.experts, R, workload::Routing::kUniform, seed + 3, me);
  DeviceArray<uint16_t> x(workload::make_bf16(size_t(T) * H, seed + 4, me)), recv(size_t(R) * 67 * H),
      comb(size_t(T) * H);
  DeviceArray<int64_t> idx(idx_host);
  HtDispatchArgs a;
  a.x = TensorView(x.get(), DType::kBF16, {T, H});
  a.topk_idx = TensorView(idx.get(), DType::kI64, {T, K});
  a.num_experts = hc.experts;
  HtDispatchOutputs o;
  HtCombineArgs ca;
  HtCombineOutputs co;
  co.combined_x = TensorView(comb.get(), DType::kBF16, {T, H});
  if (step == Step::kHtDispatch || step == Step::kHtCombine) {
    buffer->ht_notify(a, handle, Sizing::kExact, 0, st);
    o.recv_x = TensorView(recv.get(), DType::kBF16, {handle.num_recv_tokens(), H});
    ca.x = o.recv_x;
    if (step == Step::kHtCombine) buffer->ht_dispatch(a, handle, o, st);
  }
  io.load(round, st);
  if (step == Step::kLlCombine) {
    buffer->ll_dispatch(io.dispatch_args(false), io.handle, io.dispatch_outputs(), st);
    io.fill_expert_outputs(seed + 5, st);
  }
  buffer->synchronize(st);

  if (me == victim) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the survivors' kernels now wait for us
    std::ofstream(death_file) << now_ns() << "\n";
    std::printf("[rank %d] dies now, before its %s\n", me, step_name(step));
    std::fflush(stdout);
    std::fflush(stderr);
    _exit(0);
  }

  const int64_t t0 = now_ns();
  std::string message = "no error";
  ErrorCode code = ErrorCode::kInternal;
  try {
    switch (step) {
      case Step::kHtDispatch:
        buffer->ht_dispatch(a, handle, o, st);
        break;
      case Step::kHtCombine:
        buffer->ht_combine(ca, handle, co, st);
        break;
      case Step::kLlDispatch:
        buffer->ll_dispatch(io.dispatch_args(false), io.handle, io.dispatch_outputs(), st);
        break;
      case Step::kLlCombine:
        buffer->ll_combine(io.combine_args(false), io.handle, io.combine_outputs(), st);
        break;
    }
    buffer->synchronize(st);
  } catch (const Error& e) {
    message = e.what();
    code = e.code();
  }
  const int64_t t1 = now_ns();
  int64_t death = 0;
  std::ifstream(death_file) >> death;
  std::remove(death_file.c_str());
  const double after_launch = (t1 - t0) * 1e-9, after_death = death > 0 ? (t1 - death) * 1e-9 : -1.0;

  // Teardown without the dead rank.
  comm->abort();
  buffer.reset();
  comm.reset();
  cudaStreamDestroy(st);
  const double teardown = (now_ns() - t1) * 1e-9;

  std::printf(
      "FIGURE peer failure: rank %d killed mid %s; rank %d got a timeout naming it %.3f s after the "
      "death (%.3f s after its %s began; timeout %.1f s); torn down (abort + free) in %.3f s: %s\n",
      victim, step_name(step), me, after_death, after_launch, step_name(step), timeout, teardown,
      message.c_str());
  GPU_EXPECT(code == ErrorCode::kTimeout, "a timeout error, got '%s'", message.c_str());
  GPU_EXPECT(message.find("waiting for rank " + std::to_string(victim)) != std::string::npos,
             "the message to name rank %d: '%s'", victim, message.c_str());
  GPU_EXPECT(message.find(step_name(step)) != std::string::npos, "the message to name the %s: '%s'",
             step_name(step), message.c_str());
  GPU_EXPECT(death > 0 && after_death > 0 && after_death <= timeout + 0.5,
             "detection within the timeout of the death: %.3f s after it (timeout %.1f s)", after_death,
             timeout);
  GPU_EXPECT(after_launch >= 0.9 * timeout, "no earlier than the timeout after the wait began: %.3f s",
             after_launch);
  GPU_EXPECT(teardown < 10.0, "teardown in bounded time, took %.3f s", teardown);
  return 0;
}

GPU_CASE(reliability_peer_killed_mid_ht_dispatch, 2, 90) {
  return peer_killed(ctx, Step::kHtDispatch);
}
GPU_CASE(reliability_peer_killed_mid_ht_combine, 2, 90) {
  return peer_killed(ctx, Step::kHtCombine);
}
GPU_CASE(reliability_peer_killed_mid_ll_dispatch, 2, 90) {
  return peer_killed(ctx, Step::kLlDispatch);
}
GPU_CASE(reliability_peer_killed_mid_ll_combine, 2, 90) {
  return peer_killed(ctx, Step::kLlCombine);
}

}  // namespace
}  // namespace expertlink::test
