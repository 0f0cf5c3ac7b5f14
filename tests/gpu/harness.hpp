// A small harness for multi-GPU tests (the GPU machine has no GoogleTest). Each case runs on N forked
// processes, one per GPU (tools/multiproc); `el_gpu_tests <case>` is one CTest test, skipped (exit 77)
// with a printed reason where fewer GPUs than the case needs are visible.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "expertlink/communicator.hpp"
#include "expertlink/error.hpp"
#include "multiproc.hpp"

namespace expertlink::test {

using multiproc::RankContext;

struct GpuCase {
  const char* name;
  int min_ranks;
  double timeout_s;  // for the whole case, all ranks
  int (*body)(const RankContext&);
};

std::vector<GpuCase>& registry();

struct Registrar {
  Registrar(const char* name, int min_ranks, double timeout_s, int (*body)(const RankContext&)) {
    registry().push_back({name, min_ranks, timeout_s, body});
  }
};

}  // namespace expertlink::test

#define GPU_CASE(name, min_ranks, timeout_s)                                                \
  static int name(const ::expertlink::test::RankContext& ctx);                              \
  static ::expertlink::test::Registrar registrar_##name(#name, min_ranks, timeout_s, name); \
  static int name(const ::expertlink::test::RankContext& ctx)

// Fails the rank (return 1) with file:line, the condition and a formatted explanation.
#define GPU_EXPECT(cond, ...)                                                                      \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      std::fprintf(stderr, "[rank %d] %s:%d: expected %s: ", ctx.rank, __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                                           \
      std::fprintf(stderr, "\n");                                                                  \
      return 1;                                                                                    \
    }                                                                                              \
  } while (0)

namespace expertlink::test {

// Rank 0 of a run alone: a one-rank context with an id of its own (so its own communicator), for the cases
// that check one rank whatever the number of GPUs (the other ranks return at once).
inline RankContext alone(const RankContext& ctx) {
  RankContext one = ctx;
  one.num_ranks = 1;
  one.id = Communicator::make_unique_id();
  return one;
}

// Runs `call` and expects an invalid-argument Error whose message contains `needle` (the argument or the
// value it must name); 0 if so, else 1 with what came instead. Rank 0 prints the message.
template <typename F>
int expect_invalid(const RankContext& ctx, F&& call, const char* needle, const char* what) {
  std::string msg = "no error";
  bool right_code = false;
  try {
    call();
  } catch (const Error& e) {
    right_code = e.code() == ErrorCode::kInvalidArgument;
    msg = e.what();
  }
  GPU_EXPECT(right_code && msg.find(needle) != std::string::npos,
             "%s: expected an invalid-argument error containing '%s', got '%s'", what, needle, msg.c_str());
  if (ctx.rank == 0) std::printf("ok: %s -> %s\n", what, msg.c_str());
  return 0;
}

}  // namespace expertlink::test
