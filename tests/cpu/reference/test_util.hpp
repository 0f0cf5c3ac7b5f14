// Helpers of the oracle's tests: comparisons that report the first mismatching row and column, and small
// input builders.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "expertlink/error.hpp"
#include "expertlink/reference.hpp"
#include "expertlink/workload.hpp"

namespace expertlink::reference::testing {

// Equal element by element; on failure names the first mismatching [row][column] of a [rows, cols] tensor.
template <typename T>
::testing::AssertionResult same_elements(const std::vector<T>& expected, const std::vector<T>& got,
                                         int64_t cols) {
  if (expected.size() != got.size())
    return ::testing::AssertionFailure() << "size: expected " << expected.size() << ", got " << got.size();
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] != got[i]) {
      auto failure = ::testing::AssertionFailure();
      failure << "first mismatch at [" << i / cols << "][" << i % cols << "]: expected " << +expected[i]
              << ", got " << +got[i];
      if constexpr (std::is_same_v<T, uint16_t>)  // BF16 patterns: show the values too
        failure << " (BF16 " << bf16_to_float(expected[i]) << " vs " << bf16_to_float(got[i]) << ")";
      return failure;
    }
  }
  return ::testing::AssertionSuccess();
}

// BF16 tensors equal within |expected - got| <= atol + rtol * |expected| (values compared as floats).
inline ::testing::AssertionResult bf16_close(const std::vector<float>& expected,
                                             const std::vector<uint16_t>& got, int64_t cols, float rtol,
                                             float atol) {
  if (expected.size() != got.size())
    return ::testing::AssertionFailure() << "size: expected " << expected.size() << ", got " << got.size();
  for (size_t i = 0; i < expected.size(); ++i) {
    const float g = bf16_to_float(got[i]);
    if (!(std::fabs(expected[i] - g) <= atol + rtol * std::fabs(expected[i]))) {
      return ::testing::AssertionFailure() << "first mismatch at [" << i / cols << "][" << i % cols
                                           << "]: expected " << expected[i] << ", got " << g;
    }
  }
  return ::testing::AssertionSuccess();
}

// BF16 [count] of small integers in [-8, 8] (offset by `salt`): sums of a few of them are exact in BF16.
inline std::vector<uint16_t> small_int_bf16(size_t count, int salt) {
  std::vector<uint16_t> out(count);
  for (size_t i = 0; i < count; ++i)
    out[i] = float_to_bf16(
        static_cast<float>(static_cast<int>((i * 7 + static_cast<size_t>(salt) * 13) % 17) - 8));
  return out;
}

// HT inputs of R ranks drawn from the workload generators: BF16 rows, routing, weights.
inline std::vector<HtDispatchInput> ht_inputs(const std::vector<int64_t>& tokens, int64_t hidden, int topk,
                                              int num_experts, uint64_t seed, bool small_ints = false,
                                              workload::Routing routing = workload::Routing::kUniform,
                                              int masked_slots = 0) {
  const int num_ranks = static_cast<int>(tokens.size());
  std::vector<HtDispatchInput> inputs(tokens.size());
  for (int r = 0; r < num_ranks; ++r) {
    const auto n = static_cast<size_t>(tokens[r] * hidden);
    inputs[r].x =
        bf16_rows(tokens[r], hidden, small_ints ? small_int_bf16(n, r) : workload::make_bf16(n, seed, r));
    inputs[r].topk_idx =
        workload::make_topk_idx(tokens[r], topk, num_experts, num_ranks, routing, seed, r, masked_slots);
    inputs[r].topk_weights = workload::make_topk_weights(inputs[r].topk_idx, topk, seed, r);
  }
  return inputs;
}

// Runs f and expects an expertlink::Error whose message contains every one of `parts`.
template <typename F>
::testing::AssertionResult throws_with(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const Error& e) {
    const std::string what = e.what();
    if (e.code() != ErrorCode::kInvalidArgument)
      return ::testing::AssertionFailure() << "wrong code: " << what;
    for (const std::string& p : parts)
      if (what.find(p) == std::string::npos)
        return ::testing::AssertionFailure() << "message lacks \"" << p << "\": " << what;
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no expertlink::Error thrown";
}

}  // namespace expertlink::reference::testing
