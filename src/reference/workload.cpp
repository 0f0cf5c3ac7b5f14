// Workload generators of shared/WORKLOADS.md. Randomness comes from std::mt19937_64 (its output sequence is
// fixed by the C++ standard) with hand-written uniform and normal draws, because std::*_distribution differ
// between standard libraries: routings and weights are identical on every platform; make_bf16's normals go
// through std::log / std::sqrt / std::cos, whose last bit may differ between libms (then rounded to BF16,
// so a difference is rare).
#include "expertlink/workload.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "expertlink/reference.hpp"
#include "reference/checks.hpp"

namespace expertlink::workload {

using reference::detail::ll;

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// One independent stream per (seed, rank, purpose): the generators do not share draws.
enum class Stream : uint64_t { kTopkIdx = 1, kTopkWeights = 2, kBf16 = 3 };

std::mt19937_64 make_rng(uint64_t seed, int rank, Stream stream) {
  uint64_t s = splitmix64(seed);
  s = splitmix64(s ^ static_cast<uint64_t>(static_cast<uint32_t>(rank)));
  s = splitmix64(s ^ static_cast<uint64_t>(stream));
  return std::mt19937_64(s);
}

// Uniform in [0, n) without modulo bias (rejection of the incomplete top block).
uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t v;
  do v = rng();
  while (v >= limit);
  return v % n;
}

double uniform_open01(std::mt19937_64& rng) {  // (0, 1), 53 bits
  return (static_cast<double>(rng() >> 11) + 0.5) * 0x1.0p-53;
}

// Moves a uniformly random choice of `count` elements of pool[first, pool.size()) to pool[first,
// first+count), in random order (partial Fisher-Yates; any starting permutation of the pool works).
void choose(std::vector<int64_t>& pool, size_t first, size_t count, std::mt19937_64& rng) {
  for (size_t i = 0; i < count; ++i) {
    const size_t j = first + i + static_cast<size_t>(uniform_below(rng, pool.size() - first - i));
    std::swap(pool[first + i], pool[j]);
  }
}

}  // namespace

const char* routing_name(Routing routing) {
  switch (routing) {
    case Routing::kUniform:
      return "uniform";
    case Routing::kSkewed:
      return "skewed";
  }
  return "unknown";
}

std::vector<int64_t> make_topk_idx(int64_t tokens, int topk, int num_experts, int num_ranks, Routing routing,
                                   uint64_t seed, int rank, int masked_slots) {
  reference::detail::check_experts(num_experts, num_ranks);
  reference::detail::check_topk(topk);
  EL_CHECK(tokens >= 0, "tokens = %lld is negative", ll(tokens));
  EL_CHECK(topk <= num_experts, "topk = %d exceeds num_experts = %d (experts per token are distinct)", topk,
           num_experts);
  EL_CHECK(masked_slots >= 0, "masked_slots = %d is negative", masked_slots);

  std::mt19937_64 rng = make_rng(seed, rank, Stream::kTopkIdx);
  const int local = num_experts / num_ranks;
  const auto k = static_cast<size_t>(topk);
  std::vector<int64_t> topk_idx(static_cast<size_t>(tokens) * k);
  // pool holds every expert, rank 0's first ([0, local)), in an order the draws keep permuting.
  std::vector<int64_t> pool(static_cast<size_t>(num_experts));
  std::iota(pool.begin(), pool.end(), 0);
  std::vector<int64_t> picks(k);
  for (int64_t t = 0; t < tokens; ++t) {
    if (routing == Routing::kUniform || num_ranks == 1) {
      choose(pool, 0, k, rng);
      std::copy(pool.begin(), pool.begin() + topk, topk_idx.begin() + t * topk);
      continue;
    }
    // Skewed: each slot goes to rank 0's experts with probability 1/2, to the other ranks' otherwise,
    // within what distinctness allows; then the slots are shuffled.
    int to_rank0 = 0;
    for (int i = 0; i < topk; ++i) to_rank0 += static_cast<int>(rng() >> 63);
    to_rank0 = std::clamp(to_rank0, std::max(0, topk - (num_experts - local)), std::min(topk, local));
    const auto n0 = static_cast<size_t>(to_rank0);
    // The pool keeps rank 0's experts in [0, local) and the others in [local, E): draw from each part.
    std::vector<int64_t> rank0(pool.begin(), pool.begin() + local);
    std::vector<int64_t> others(pool.begin() + local, pool.end());
    choose(rank0, 0, n0, rng);
    choose(others, 0, k - n0, rng);
    std::copy(rank0.begin(), rank0.end(), pool.begin());
    std::copy(others.begin(), others.end(), pool.begin() + local);
    std::copy(rank0.begin(), rank0.begin() + to_rank0, picks.begin());
    std::copy(others.begin(), others.begin() + (topk - to_rank0), picks.begin() + to_rank0);
    choose(picks, 0, k, rng);
    std::copy(picks.begin(), picks.end(), topk_idx.begin() + t * topk);
  }

  const auto slots = topk_idx.size();
  const auto masked = std::min(static_cast<size_t>(masked_slots), slots);
  if (masked > 0) {
    std::vector<int64_t> positions(slots);
    std::iota(positions.begin(), positions.end(), 0);
    choose(positions, 0, masked, rng);
    for (size_t i = 0; i < masked; ++i) topk_idx[static_cast<size_t>(positions[i])] = -1;
  }
  return topk_idx;
}

std::vector<float> make_topk_weights(const std::vector<int64_t>& topk_idx, int topk, uint64_t seed,
                                     int rank) {
  reference::detail::check_topk(topk);
  EL_CHECK(topk_idx.size() % static_cast<size_t>(topk) == 0,
           "topk_idx has %lld elements, not a multiple of topk = %d",
           ll(static_cast<int64_t>(topk_idx.size())), topk);
  std::mt19937_64 rng = make_rng(seed, rank, Stream::kTopkWeights);
  std::vector<float> weights(topk_idx.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    // [0.25, 1.25) on a 2^-24 grid: positive, exact in float, never degenerate.
    const float w = 0.25f + static_cast<float>(rng() >> 40) * 0x1.0p-24f;
    weights[i] = topk_idx[i] < 0 ? 0.0f : w;
  }
  return weights;
}

std::vector<uint16_t> make_bf16(size_t count, uint64_t seed, int rank) {
  std::mt19937_64 rng = make_rng(seed, rank, Stream::kBf16);
  std::vector<uint16_t> out(count);
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (size_t i = 0; i < count; i += 2) {  // Box-Muller: two normals per pair of uniforms
    const double radius = std::sqrt(-2.0 * std::log(uniform_open01(rng)));
    const double angle = kTwoPi * uniform_open01(rng);
    out[i] = reference::float_to_bf16(static_cast<float>(radius * std::cos(angle)));
    if (i + 1 < count) out[i + 1] = reference::float_to_bf16(static_cast<float>(radius * std::sin(angle)));
  }
  return out;
}

}  // namespace expertlink::workload
