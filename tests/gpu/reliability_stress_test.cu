// Stress (issue 6): many rounds on ONE Buffer mixing HT and LL calls with random shapes, routings
// (uniform, skewed, every slot -1, ranks without tokens), dtypes (BF16, FP8 with f32 or UE8M0 scales),
// sizing modes, SM counts and split (hook) calls, every result checked against the oracle (dispatch
// bitwise, combine as ht_check / ll_check do). Rounds: $EXPERTLINK_STRESS_ROUNDS (default 300, the
// normal suite); the full proof is 10000. Every rank draws the same choices from the run's seed, so every
// rank makes the same calls in the same order.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "ht_check.hpp"
#include "ll_check.hpp"

namespace expertlink::test {
namespace {

using htt::Fmt;
using htt::HtCase;
using llt::LlCase;
using llt::LlIo;
using llt::LlRound;
using workload::Routing;

int stress_rounds() {
  const char* env = std::getenv("EXPERTLINK_STRESS_ROUNDS");
  const int n = env != nullptr ? std::atoi(env) : 0;
  return n > 0 ? n : 300;
}

// The case's deadline grows with the rounds (~20 ms each on 2x H200 is the guess; 4x that allowed).
double stress_timeout_s() {
  return 120.0 + 0.08 * stress_rounds();
}

// Shape menus: every shape here fits the Buffer sized below.
constexpr int kHtMaxTokens = 96;  // + 3 on odd ranks (htt::tokens_of)
constexpr int kHtHidden[] = {128, 256, 512, 1024, 2048, 2944, 4096};
constexpr int kHtBf16OnlyHidden[] = {136, 520, 2880};  // BF16 rows of 16-byte multiples, no 128-groups
constexpr int kExperts[] = {2, 4, 8, 16, 32, 64, 128, 256};
constexpr int kLlMaxCapacity = 32;
constexpr int kLlHidden[] = {128, 512, 1024, 2176, 4096, 7168};
constexpr int kLlBf16OnlyHidden[] = {200, 2880};
constexpr int kLlExperts[] = {2, 4, 8, 16, 32, 64};  // outputs [E/R, R*N, H] stay small

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  int below(int n) { return static_cast<int>(g() % static_cast<uint64_t>(n)); }
  bool chance(int percent) { return below(100) < percent; }
  template <typename T, size_t N>
  T pick(const T (&a)[N]) {
    return a[below(static_cast<int>(N))];
  }
};

// Experts of a menu that the ranks divide, at least `at_least`.
template <size_t N>
int pick_experts(Rng& rng, const int (&menu)[N], int ranks, int at_least) {
  std::vector<int> ok;
  for (int e : menu)
    if (e % ranks == 0 && e >= at_least) ok.push_back(e);
  return ok.empty() ? ranks * ((at_least + ranks - 1) / ranks) : ok[rng.below(static_cast<int>(ok.size()))];
}

HtCase random_ht(Rng& rng, int ranks, std::string& name) {
  HtCase c{"", 0, 0, 1, 2};
  const int f = rng.below(10);
  c.fmt = f < 5 ? Fmt::kBf16 : f < 8 ? Fmt::kFp8 : Fmt::kFp8Ue8m0;
  c.hidden = c.fmt == Fmt::kBf16 && rng.chance(25) ? rng.pick(kHtBf16OnlyHidden) : rng.pick(kHtHidden);
  c.tokens = rng.chance(10) ? rng.below(3) : rng.below(kHtMaxTokens + 1);
  c.experts = pick_experts(rng, kExperts, ranks, 1);
  c.topk = 1 + rng.below(std::min(c.experts, kHtMaxTopk));
  c.idx_i32 = rng.chance(50);
  c.routing = rng.chance(30) ? Routing::kSkewed : Routing::kUniform;
  const int slots = c.tokens * c.topk;
  const int m = rng.below(10);
  c.masked_slots = m < 5 ? 0 : m < 9 ? rng.below(slots + 1) / 2 : slots;  // "every slot -1" one time in ten
  const int a = rng.below(4);
  c.expert_alignment = a == 0 ? 4 : a == 1 ? 128 : 1;
  c.sizing = rng.chance(50) ? Sizing::kCapacity : Sizing::kExact;
  const int z = rng.below(8);
  c.zero_tokens_rank = z < ranks && z < 2 ? z : -1;  // a rank without tokens one time in four
  c.with_bias = rng.chance(50);
  const int s = rng.below(4);
  c.num_sms = s == 0 ? 1 : s == 1 ? 8 : 0;
  name = std::string("HT ") +
         (c.fmt == Fmt::kBf16  ? "bf16"
          : c.fmt == Fmt::kFp8 ? "fp8"
                               : "fp8-ue8m0") +
         " T=" + std::to_string(c.tokens) + " H=" + std::to_string(c.hidden) + " top-" +
         std::to_string(c.topk) + "/" + std::to_string(c.experts) + (c.idx_i32 ? " i32" : " i64") + " " +
         workload::routing_name(c.routing) + " masked=" + std::to_string(c.masked_slots) +
         " align=" + std::to_string(c.expert_alignment) +
         (c.sizing == Sizing::kCapacity ? " capacity" : " exact") +
         " empty-rank=" + std::to_string(c.zero_tokens_rank) + (c.with_bias ? " bias" : "") +
         " sms=" + std::to_string(c.num_sms);
  return c;
}

LlCase random_ll(Rng& rng, int ranks, std::string& name) {
  LlCase c{"", 1, 128, 1, 2};
  c.fp8 = rng.chance(70);
  c.round_scale = c.fp8 && rng.chance(50);
  c.ue8m0 = c.round_scale && rng.chance(60);
  c.hidden = !c.fp8 && rng.chance(30) ? rng.pick(kLlBf16OnlyHidden) : rng.pick(kLlHidden);
  c.capacity = 1 + rng.below(kLlMaxCapacity);
  c.experts = pick_experts(rng, kLlExperts, ranks, 1);
  c.topk = 1 + rng.below(std::min(c.experts, kLlMaxTopk));
  c.idx_i32 = rng.chance(50);
  c.routing = rng.chance(30) ? Routing::kSkewed : Routing::kUniform;
  const int m = rng.below(10);
  c.masked_slots = m < 3 ? 0 : m < 9 ? rng.below(c.capacity * c.topk + 1) / 2 : c.capacity * c.topk;
  c.range_i32 = rng.chance(50);
  c.row_major_scales = rng.chance(50);
  c.duplicates = rng.chance(20);
  name = std::string("LL ") +
         (!c.fp8          ? "bf16"
          : c.ue8m0       ? "fp8-ue8m0"
          : c.round_scale ? "fp8-round"
                          : "fp8") +
         " N=" + std::to_string(c.capacity) + " H=" + std::to_string(c.hidden) + " top-" +
         std::to_string(c.topk) + "/" + std::to_string(c.experts) + (c.idx_i32 ? " i32" : " i64") + " " +
         workload::routing_name(c.routing) + " masked=" + std::to_string(c.masked_slots) +
         (c.duplicates ? " duplicates" : "");
  return c;
}

// Tokens per rank: all N, none (an empty rank), or random in [0, N].
std::vector<int> random_tokens(Rng& rng, const LlCase& c, int ranks) {
  std::vector<int> t(ranks);
  for (int& v : t) {
    const int k = rng.below(10);
    v = k < 3 ? c.capacity : k < 5 ? 0 : rng.below(c.capacity + 1);
  }
  return t;
}

size_t ll_bytes_for_menus(int ranks) {
  size_t bytes = 0;
  for (int h : kLlHidden)
    for (int e : kLlExperts)
      if (e % ranks == 0) bytes = std::max(bytes, Buffer::ll_size_hint(ranks, kLlMaxCapacity, h, e));
  for (int h : kLlBf16OnlyHidden)
    for (int e : kLlExperts)
      if (e % ranks == 0) bytes = std::max(bytes, Buffer::ll_size_hint(ranks, kLlMaxCapacity, h, e));
  return bytes;
}

// One LL round of `mode`: 0 fused, 1 split with one call in flight, 2 split with two in flight (two
// rounds of the same case). Returns 0 when every output matched.
int ll_round(const RankContext& ctx, Buffer& buf, cudaStream_t st, const LlCase& c, Rng& rng, uint64_t seed,
             int mode) {
  const int R = ctx.num_ranks;
  LlIo a(c, R, ctx.rank);
  const LlRound ra = llt::make_round(c, R, seed, random_tokens(rng, c, R));
  if (mode == 0) return llt::run_fused(ctx, buf, st, a, ra, seed + 3);
  if (mode == 1) return llt::run_split(ctx, buf, st, a, ra, seed + 3);
  LlIo b(c, R, ctx.rank);
  const LlRound rb = llt::make_round(c, R, seed + 1, random_tokens(rng, c, R));
  return llt::run_two_split(ctx, buf, st, a, ra, seed + 3, b, rb, seed + 4) != 0;
}

GPU_CASE(reliability_stress_mixed_ht_ll_one_buffer, 2, stress_timeout_s()) {
  const int R = ctx.num_ranks, rounds = stress_rounds();
  int max_hidden = 0;
  for (int h : kHtHidden) max_hidden = std::max(max_hidden, h);
  Communicator comm(ctx.id, ctx.rank, R, ctx.device);
  Buffer buffer(comm, Buffer::ht_size_hint(R, kHtMaxTokens + 3, max_hidden, kHtMaxTopk),
                ll_bytes_for_menus(R));
  cudaStream_t st;
  cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
  const uint64_t seed = run_seed(ctx.id);
  if (ctx.rank == 0)
    std::printf("seed %llu, %d rounds, HT %zu bytes, LL %zu bytes\n", static_cast<unsigned long long>(seed),
                rounds, buffer.ht_bytes(), buffer.ll_bytes());
  Rng rng(seed);
  HtHandle handle;  // reused across HT rounds of every shape
  int ht = 0, ll = 0, ll_split = 0, fp8 = 0, all_masked = 0, empty_rank = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < rounds; ++i) {
    const uint64_t s = seed + 1000003ull * (i + 1);
    std::string name;
    int rc = 0;
    if (rng.chance(55)) {
      HtCase c = random_ht(rng, R, name);
      c.name = name.c_str();
      rc = htt::run_round(ctx, c, buffer, handle, s, st, rng.chance(20));
      ++ht;
      fp8 += c.fmt != Fmt::kBf16;
      all_masked += c.masked_slots == c.tokens * c.topk;
      empty_rank += c.zero_tokens_rank >= 0;
    } else {
      LlCase c = random_ll(rng, R, name);
      c.name = name.c_str();
      const int mode = rng.below(3);
      rc = ll_round(ctx, buffer, st, c, rng, s, mode);
      ++ll;
      ll_split += mode > 0;
      fp8 += c.fp8;
      all_masked += c.masked_slots == c.capacity * c.topk;
    }
    if (rc != 0) {
      std::printf("FIGURE stress: FAILED at round %d of %d on rank %d: %s\n", i, rounds, ctx.rank,
                  name.c_str());
      return 1;
    }
    if (ctx.rank == 0 && (i + 1) % 1000 == 0) std::printf("stress: %d rounds ok\n", i + 1);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (ctx.rank == 0)
    std::printf(
        "FIGURE stress: %d rounds on one Buffer, 0 mismatches (%d HT notify+dispatch+combine, %d LL "
        "dispatch+combine of which %d split; %d FP8, %d with every slot -1, %d with an empty rank), "
        "%.1f s, %d ranks\n",
        rounds, ht, ll, ll_split, fp8, all_masked, empty_rank, secs, R);
  cudaStreamDestroy(st);
  return 0;
}

}  // namespace
}  // namespace expertlink::test
