// The argument checks of the Buffer API (src/api_checks.hpp) without a GPU: every kind of bad argument
// they catch raises Error(kInvalidArgument) whose message names the argument and the bad value. The GPU
// suite (tests/gpu/reliability_test.cu) makes the same mistakes through Buffer on two ranks.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "api_checks.hpp"
#include "expertlink/buffer.hpp"
#include "expertlink/error.hpp"

namespace expertlink {
namespace {

// Runs `call`, expects an invalid-argument Error whose message contains every one of `needles`.
void expect_rejected(const std::function<void()>& call, const std::vector<std::string>& needles) {
  try {
    call();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    for (const std::string& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
    return;
  }
  ADD_FAILURE() << "no error; expected one naming '" << needles.front() << "'";
}

// Any 16-byte aligned address: the pure checks never dereference it.
void* fake(uintptr_t offset = 0) {
  return reinterpret_cast<void*>(uintptr_t{0x10000} + offset);
}

TEST(ApiChecks, ViewRejectsNegativeExtentNullDataAndTooManyDimensions) {
  expect_rejected(
      [] {
        checks::view(TensorView(fake(), DType::kBF16, {-3, 128}), "x");
      },
      {"x", "extent -3", "negative"});
  expect_rejected(
      [] {
        checks::view(TensorView(nullptr, DType::kBF16, {4, 128}), "x");
      },
      {"x.data is null", "512 elements"});
  TensorView five;
  five.ndim = 5;
  expect_rejected([&] { checks::view(five, "recv_x"); }, {"recv_x has 5 dimensions"});
  EXPECT_NO_THROW(
      checks::view(TensorView(nullptr, DType::kBF16, {0, 128}), "x"));  // empty: no pointer needed
  EXPECT_NO_THROW(checks::view(TensorView(), "bias0"));                 // not given
}

TEST(ApiChecks, RequiredNamesTheMissingArgument) {
  expect_rejected([] { checks::required(TensorView(), "topk_idx"); }, {"topk_idx is required"});
}

TEST(ApiChecks, TopkIdxDtypeRowsAndTopkBounds) {
  expect_rejected(
      [] {
        checks::topk_idx(TensorView(fake(), DType::kF32, {8, 4}), 8, kHtMaxTopk, "topk_idx");
      },
      {"topk_idx must be i64 or i32", "f32"});
  expect_rejected(
      [] {
        checks::topk_idx(TensorView(fake(), DType::kI64, {5, 4}), 8, kHtMaxTopk, "topk_idx");
      },
      {"topk_idx has 5 rows", "8 tokens"});
  expect_rejected(
      [] {
        checks::topk_idx(TensorView(fake(), DType::kI64, {8, 33}), 8, kHtMaxTopk, "topk_idx");
      },
      {"top-k = 33", "[1, 32]"});
  expect_rejected(
      [] {
        checks::topk_idx(TensorView(fake(), DType::kI32, {8, 17}), 8, kLlMaxTopk, "topk_idx");
      },
      {"top-k = 17", "[1, 16]"});
  expect_rejected(
      [] {
        checks::topk_idx(TensorView(fake(), DType::kI64, {8, 4, 1}), 8, kHtMaxTopk, "topk_idx");
      },
      {"topk_idx must be 2-D"});
  EXPECT_EQ(checks::topk_idx(TensorView(fake(), DType::kI32, {8, 32}), 8, kHtMaxTopk, "topk_idx"), 32);
  EXPECT_EQ(checks::topk_idx(TensorView(nullptr, DType::kI64, {0, 8}), 0, kLlMaxTopk, "topk_idx"), 8);
}

TEST(ApiChecks, NumExpertsMustBeAMultipleOfTheRanksWithinTheMaximum) {
  expect_rejected([] { checks::num_experts(7, 2, kHtMaxExperts); }, {"num_experts = 7", "2 ranks"});
  expect_rejected([] { checks::num_experts(0, 2, kHtMaxExperts); }, {"num_experts = 0"});
  expect_rejected([] { checks::num_experts(2048, 2, kLlMaxExperts); },
                  {"num_experts = 2048", "at most 1024"});
  expect_rejected([] { checks::num_experts(3, 4, kLlMaxExperts); }, {"num_experts = 3", "at least 4"});
  EXPECT_NO_THROW(checks::num_experts(288, 8, kLlMaxExperts));
}

TEST(ApiChecks, TokenRowsStrideAlignmentWidthAndFp8Groups) {
  expect_rejected(
      [] {
        checks::token_rows(TensorView(fake(), DType::kBF16, {4, 64}, {128, 2}), "x");
      },
      {"x rows must be contiguous", "strides [128, 2]"});
  expect_rejected(
      [] {
        checks::token_rows(TensorView(fake(), DType::kBF16, {4, 100}), "x");
      },
      {"x rows", "bf16[4, 100]"});
  expect_rejected(
      [] {
        checks::token_rows(TensorView(fake(8), DType::kBF16, {4, 64}), "x");
      },
      {"x rows", "16-byte aligned"});
  expect_rejected(
      [] {
        checks::token_rows(TensorView(fake(), DType::kFP8E4M3, {4, 144}), "x");
      },
      {"x is fp8 with hidden = 144", "multiple of 128"});
  expect_rejected([] { checks::token_rows(TensorView(fake(), DType::kBF16, {512}), "x"); },
                  {"x must be 2-D"});
  EXPECT_NO_THROW(checks::token_rows(TensorView(fake(), DType::kFP8E4M3, {4, 7168}), "x"));
  EXPECT_NO_THROW(checks::token_rows(TensorView(fake(), DType::kBF16, {4, 2880}, {4096, 1}), "x"));
}

TEST(ApiChecks, PointerLocationAndStreamDevice) {
  expect_rejected([] { checks::location("x", fake(), checks::Memory::kUnregistered, -1, 0); },
                  {"x (", "not memory a GPU can reach"});
  expect_rejected([] { checks::location("recv_x", fake(), checks::Memory::kDevice, 1, 0); },
                  {"recv_x", "lives on device 1", "buffer is on device 0"});
  EXPECT_NO_THROW(checks::location("x", fake(), checks::Memory::kDevice, 0, 0));
  EXPECT_NO_THROW(checks::location("x", fake(), checks::Memory::kPinnedHost, 0, 0));
  EXPECT_NO_THROW(checks::location("x", fake(), checks::Memory::kManaged, 1, 0));
  expect_rejected([] { checks::stream_device(1, 0); }, {"stream belongs to device 1", "device 0"});
}

TEST(ApiChecks, TensorsChecksEveryViewBeforeAskingTheRuntime) {
  const TensorView good(fake(), DType::kBF16, {4, 64});
  const TensorView null_out(nullptr, DType::kBF16, {4, 64});
  expect_rejected(
      [&] {
        checks::tensors({{&good, "x"}, {&null_out, "combined_x"}}, 0, nullptr);
      },
      {"combined_x.data is null"});
}

}  // namespace
}  // namespace expertlink
