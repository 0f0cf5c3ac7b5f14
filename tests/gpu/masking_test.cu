// Rank masking (issue 6): the last rank stops taking part right after the Buffer is built (it stays
// alive, idle, so that the collective teardown at the end still has every rank). The others first call
// as usual and must get a timeout naming it; then they mask it (Buffer::mask_rank) and the same Buffer
// must give the oracle's results computed without that rank: its tokens absent, picks of its experts
// as -1 (HT dispatch + cached dispatch + combine in BF16 / FP8 / UE8M0 and both sizings, LL dispatch +
// combine in FP8 and BF16, barriers).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "ht_check.hpp"
#include "ll_check.hpp"

namespace expertlink::test {
namespace {

using htt::Fmt;
using htt::HtCase;
using llt::LlCase;
using llt::LlIo;

GPU_CASE(mask_dead_rank_others_match_oracle, 2, 240) {
  const int R = ctx.num_ranks, me = ctx.rank, dead = R - 1;
  const uint64_t seed = run_seed(ctx.id);
  const std::string done_file = "/tmp/expertlink_mask_done_" + std::to_string(seed);
  RuntimeOptions options;
  options.timeout_s = 1.0;
  Communicator comm(ctx.id, me, R, ctx.device);
  const LlCase l8{"ll fp8 N=32 H=2048 top-8/32", 32, 2048, 8, 32};
  LlCase l16{"ll bf16 N=32 H=2048 top-8/32", 32, 2048, 8, 32};
  l16.fp8 = false;
  Buffer buffer(comm, Buffer::ht_size_hint(R, 131, 2048, 8), llt::ll_bytes_for({l8, l16}, R), options);
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);

  if (me == dead) {  // idle until the others are done, then the collective teardown
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(200);
    while (!std::ifstream(done_file).good()) {
      GPU_EXPECT(std::chrono::steady_clock::now() < until, "the live ranks never finished");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    cudaStreamDestroy(stream);
    return 0;
  }

  // The idle rank is released however this rank leaves (a failed check, an exception).
  struct Release {
    std::string file;
    ~Release() { std::ofstream(file) << "done\n"; }
  } release{done_file};

  // 1. Unmasked, a call waits for the silent rank and times out naming it.
  const HtCase probe{"probe bf16 T=64 H=2048 top-8/32", 64, 2048, 8, 32};
  HtHandle handle;
  std::string message = "no error";
  const auto t0 = std::chrono::steady_clock::now();
  {
    HtCase masked_probe = probe;
    masked_probe.dead_rank = dead;
    // The round's own checks never run: notify times out on the silent rank.
    try {
      htt::run_round(ctx, masked_probe, buffer, handle, seed, stream, false);
    } catch (const Error& e) {
      GPU_EXPECT(e.code() == ErrorCode::kTimeout, "expected a timeout, got: %s", e.what());
      message = e.what();
    }
  }
  const double detect_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  GPU_EXPECT(message.find("rank " + std::to_string(dead)) != std::string::npos,
             "the timeout does not name rank %d: %s", dead, message.c_str());
  std::printf("FIGURE masking: rank %d detected silent rank %d after %.2f s (timeout 1 s): %s\n", me, dead,
              detect_s, message.c_str());

  // 2. Masked: the same buffer goes on without it.
  buffer.mask_rank(dead);
  GPU_EXPECT(buffer.is_rank_masked(dead) && !buffer.is_rank_masked(me), "mask state");
  int rounds = 0;
  for (int i = 0; i < 3; ++i) {
    buffer.barrier(stream);
    HtCase a{"masked bf16 exact uniform", 64, 2048, 8, 32};
    HtCase b{"masked fp8 capacity skewed", 100, 2048, 8, 32, Fmt::kFp8};
    b.sizing = Sizing::kCapacity;
    b.routing = workload::Routing::kSkewed;
    HtCase u{"masked ue8m0 exact, masked slots", 48, 2048, 6, 32, Fmt::kFp8Ue8m0};
    u.masked_slots = 20;
    for (HtCase* c : {&a, &b, &u}) {
      c->dead_rank = dead;
      HtHandle h;
      if (htt::run_round(ctx, *c, buffer, h, seed + 1000 * i + rounds, stream, true) != 0) return 1;
      ++rounds;
    }
    for (const LlCase* c : {static_cast<const LlCase*>(&l8), static_cast<const LlCase*>(&l16)}) {
      std::vector<int> tokens(R, c->capacity - 3);
      tokens[dead] = 0;
      const auto r = llt::make_round(*c, R, seed + 7000 + 100 * i + rounds, tokens, dead);
      LlIo io(*c, R, me);
      if (llt::run_fused(ctx, buffer, stream, io, r, seed + 9000 + rounds) != 0) return 1;
      ++rounds;
    }
  }
  buffer.synchronize(stream);
  std::printf(
      "FIGURE masking: rank %d masked rank %d and ran %d HT + LL rounds on the same Buffer, all equal "
      "to the oracle without it\n",
      me, dead, rounds);
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace
}  // namespace expertlink::test
