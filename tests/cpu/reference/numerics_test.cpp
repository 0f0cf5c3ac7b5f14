// Numeric conversions and the per-128-channel FP8 cast of the oracle. The CUDA headers' host
// implementations are the ground truth for bit-exactness (they agree with the device instructions).
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "test_util.hpp"

namespace expertlink::reference {
namespace {

using testing::throws_with;

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

uint16_t cuda_bf16(float f) {
  __nv_bfloat16_raw raw = __float2bfloat16_rn(f);
  return raw.x;
}

uint8_t cuda_e4m3(float f) {
  return __nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3);
}

// Float patterns covering every exponent, both signs, every top-20-bit mantissa prefix, and low bits
// that make exact midpoints, just-above and just-below cases.
template <typename F>
void for_sampled_floats(F&& f) {
  const uint32_t lows[] = {0x000, 0x001, 0x7FF, 0x800, 0x801, 0xFFF};
  for (uint32_t hi = 0; hi < (1u << 20); ++hi)
    for (uint32_t low : lows) f((hi << 12) | low);
}

TEST(Bf16, EveryPatternRoundTripsExceptNanWhichBecomesCanonical) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const auto bits = static_cast<uint16_t>(b);
    const bool nan = (bits & 0x7FFF) > 0x7F80;
    ASSERT_EQ(float_to_bf16(bf16_to_float(bits)), nan ? 0x7FFF : bits) << "pattern 0x" << std::hex << b;
  }
}

TEST(Bf16, MidpointsRoundToNearestEven) {
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808000u)), 0x3F80);             // 1 + 2^-8: halfway, 0x3F80 is even
  EXPECT_EQ(float_to_bf16(from_bits(0x3F818000u)), 0x3F82);             // halfway above odd 0x3F81: up
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808001u)), 0x3F81);             // just above halfway: up
  EXPECT_EQ(float_to_bf16(from_bits(0xBF808000u)), 0xBF80);             // negative halfway: to even
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up to +inf
}

TEST(Bf16, NanOfEitherSignGivesCanonicalQuietNan) {
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::quiet_NaN()), 0x7FFF);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::quiet_NaN()), 0x7FFF);
  EXPECT_EQ(float_to_bf16(from_bits(0x7F800001u)), 0x7FFF);  // signalling NaN
  EXPECT_TRUE(std::isnan(bf16_to_float(0x7FFF)));
}

TEST(Bf16, MatchesCudaHostConversionOnSampledFloats) {
  uint64_t mismatches = 0;
  uint32_t first = 0;
  for_sampled_floats([&](uint32_t u) {
    if (float_to_bf16(from_bits(u)) != cuda_bf16(from_bits(u)) && mismatches++ == 0) first = u;
  });
  EXPECT_EQ(mismatches, 0u) << "first float 0x" << std::hex << first << ": expected 0x"
                            << cuda_bf16(from_bits(first)) << ", got 0x" << float_to_bf16(from_bits(first));
}

TEST(E4m3, AllCodesDecodeAndRoundTrip) {
  for (int b = 0; b < 256; ++b) {
    const auto code = static_cast<uint8_t>(b);
    const float v = e4m3_to_float(code);
    if ((code & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(v)) << "code 0x" << std::hex << b;
      EXPECT_EQ(bits_of(v), 0x7FFFE000u);
      EXPECT_EQ(float_to_e4m3(v), 0x7F);
      continue;
    }
    __nv_fp8_e4m3 cuda;
    cuda.__x = code;
    EXPECT_EQ(bits_of(v), bits_of(static_cast<float>(cuda))) << "code 0x" << std::hex << b;
    EXPECT_EQ(float_to_e4m3(v), code) << "code 0x" << std::hex << b << " value " << v;
  }
  EXPECT_EQ(e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(e4m3_to_float(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));  // smallest denormal
  EXPECT_EQ(bits_of(e4m3_to_float(0x80)), 0x80000000u);  // -0
}

TEST(E4m3, EveryMidpointRoundsToEvenAndNeighboursRoundToNearest) {
  for (uint8_t a = 0; a < 0x7E; ++a) {
    const float lo = e4m3_to_float(a);
    const float hi = e4m3_to_float(static_cast<uint8_t>(a + 1));
    const float mid = (lo + hi) / 2;  // exact: e4m3 values have 4 significant bits
    const uint8_t even = (a % 2 == 0) ? a : static_cast<uint8_t>(a + 1);
    for (float sign : {1.0f, -1.0f}) {
      const uint8_t s = sign < 0 ? 0x80 : 0x00;
      EXPECT_EQ(float_to_e4m3(sign * mid), even | s) << "midpoint " << sign * mid;
      EXPECT_EQ(float_to_e4m3(sign * std::nextafter(mid, hi)), (a + 1) | s) << "above " << sign * mid;
      EXPECT_EQ(float_to_e4m3(sign * std::nextafter(mid, lo)), a | s) << "below " << sign * mid;
    }
  }
}

TEST(E4m3, FiniteOverflowAndInfinitySaturateTo448) {
  EXPECT_EQ(float_to_e4m3(448.0f), 0x7E);
  EXPECT_EQ(float_to_e4m3(463.99f), 0x7E);
  EXPECT_EQ(float_to_e4m3(464.0f), 0x7E);  // halfway to 480 (not a value): to even 0x7E
  EXPECT_EQ(float_to_e4m3(464.01f), 0x7E);
  EXPECT_EQ(float_to_e4m3(1e30f), 0x7E);
  EXPECT_EQ(float_to_e4m3(-1e30f), 0xFE);
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::infinity()), 0x7E);
  EXPECT_EQ(float_to_e4m3(-std::numeric_limits<float>::infinity()), 0xFE);
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::max()), 0x7E);
}

TEST(E4m3, NanOfEitherSignGivesPositiveNan0x7F) {
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(float_to_e4m3(-std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(float_to_e4m3(from_bits(0xFF800001u)), 0x7F);  // negative signalling NaN
  EXPECT_EQ(cuda_e4m3(-std::numeric_limits<float>::quiet_NaN()), 0x7F);
}

TEST(E4m3, DenormalsRoundToNearestEven) {
  const float d = std::ldexp(1.0f, -9);  // smallest denormal
  EXPECT_EQ(float_to_e4m3(d), 0x01);
  EXPECT_EQ(float_to_e4m3(3 * d), 0x03);
  EXPECT_EQ(float_to_e4m3(1.5f * d), 0x02);  // halfway 1 | 2: even
  EXPECT_EQ(float_to_e4m3(2.5f * d), 0x02);  // halfway 2 | 3: even
  EXPECT_EQ(float_to_e4m3(7.5f * d), 0x08);  // halfway to the smallest normal
  EXPECT_EQ(float_to_e4m3(-0.75f * d), 0x81);
  EXPECT_EQ(float_to_e4m3(0.5f * d), 0x00);  // exactly half the smallest denormal: to even zero
  EXPECT_EQ(float_to_e4m3(std::nextafter(0.5f * d, 1.0f)), 0x01);
}

TEST(E4m3, ZeroAndUnderflowKeepTheSign) {
  EXPECT_EQ(float_to_e4m3(0.0f), 0x00);
  EXPECT_EQ(float_to_e4m3(-0.0f), 0x80);
  EXPECT_EQ(float_to_e4m3(-1e-30f), 0x80);
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::denorm_min()), 0x00);
  EXPECT_EQ(float_to_e4m3(-std::numeric_limits<float>::denorm_min()), 0x80);
}

TEST(E4m3, MatchesCudaHostConversionOnSampledFloats) {
  uint64_t mismatches = 0;
  uint32_t first = 0;
  for_sampled_floats([&](uint32_t u) {
    if (float_to_e4m3(from_bits(u)) != cuda_e4m3(from_bits(u)) && mismatches++ == 0) first = u;
  });
  EXPECT_EQ(mismatches, 0u) << "first float 0x" << std::hex << first << ": expected 0x"
                            << +cuda_e4m3(from_bits(first)) << ", got 0x" << +float_to_e4m3(from_bits(first));
}

TEST(E4m3, MatchesCudaHostConversionOnEveryThirdFloatNearTheE4m3Range) {
  // Every third float in [2^-11, 2^9), both signs: rounding of normal and denormal e4m3 values.
  uint64_t mismatches = 0;
  for (uint32_t u = bits_of(std::ldexp(1.0f, -11)); u < bits_of(512.0f); u += 3) {
    mismatches += float_to_e4m3(from_bits(u)) != cuda_e4m3(from_bits(u));
    mismatches += float_to_e4m3(-from_bits(u)) != cuda_e4m3(-from_bits(u));
  }
  EXPECT_EQ(mismatches, 0u);
}

// ---------------------------------------------------------------------------------------------------
// Per-128-channel cast
// ---------------------------------------------------------------------------------------------------

std::vector<uint16_t> bf16_of(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = float_to_bf16(v[i]);
  return out;
}

TEST(Fp8Cast, ScaleIsAmaxOver448AndAmaxMapsTo448) {
  std::vector<float> v(128);
  for (int i = 0; i < 128; ++i) v[i] = static_cast<float>(i % 7) * 0.375f - 1.0f;
  v[77] = -3.0f;  // amax
  const auto x = bf16_of(v);
  const TokenRows q = cast_to_fp8(x.data(), 1, 128, false, false);
  ASSERT_EQ(q.scales.size(), 1u);
  EXPECT_EQ(q.scales[0], 3.0f / 448.0f);
  EXPECT_EQ(q.fp8[77], 0xFE);
  for (int i = 0; i < 128; ++i) EXPECT_EQ(q.fp8[i], float_to_e4m3(v[i] / (3.0f / 448.0f))) << "channel " << i;
}

TEST(Fp8Cast, AllZeroGroupUsesAmaxFloor) {
  std::vector<uint16_t> x(256, 0);
  x[200] = float_to_bf16(0.5f);
  const TokenRows q = cast_to_fp8(x.data(), 1, 256, false, false);
  EXPECT_EQ(q.scales[0], kFp8AmaxFloor / 448.0f);
  EXPECT_EQ(q.scales[1], 0.5f / 448.0f);
  for (int i = 0; i < 128; ++i) EXPECT_EQ(q.fp8[i], 0x00);
}

TEST(Fp8Cast, NanElementIsIgnoredByAmaxAndEncodedAsNan) {
  std::vector<uint16_t> x = bf16_of(std::vector<float>(128, 2.0f));
  x[5] = 0x7FC0;  // NaN
  const TokenRows q = cast_to_fp8(x.data(), 1, 128, false, false);
  EXPECT_EQ(q.scales[0], 2.0f / 448.0f);
  EXPECT_EQ(q.fp8[5], 0x7F);
  EXPECT_EQ(q.fp8[6], 0x7E);
}

TEST(Fp8Cast, RoundScaleGivesSmallestPowerOfTwoAtLeastAmaxOver448) {
  const std::vector<uint16_t> x = workload::make_bf16(8 * 1024, 11, 0);
  const TokenRows q = cast_to_fp8(x.data(), 8, 1024, true, false);
  for (int64_t r = 0; r < 8; ++r) {
    for (int64_t g = 0; g < 8; ++g) {
      const float sf = q.scales[r * 8 + g];
      EXPECT_EQ(bits_of(sf) & 0x7FFFFFu, 0u) << "row " << r << " group " << g << " sf " << sf;
      const float exact = fp8_group_scale(&x[r * 1024 + g * 128], 128, false);
      EXPECT_GE(sf, exact);
      EXPECT_LT(sf / 2, exact);
    }
  }
  // A scale that is already a power of two stays.
  std::vector<uint16_t> y = bf16_of(std::vector<float>(128, 448.0f * 0.25f));
  EXPECT_EQ(fp8_group_scale(y.data(), 128, true), 0.25f);
}

TEST(Fp8Cast, Ue8m0PacksFourGroupBytesPerWordLittleEndianWithZeroPadding) {
  // hidden 640 = 5 groups -> 2 words; group g has amax 448 * 2^(g - 3), so sf = 2^(g - 3), byte 124 + g.
  std::vector<float> v(640);
  for (int g = 0; g < 5; ++g)
    for (int i = 0; i < 128; ++i) v[g * 128 + i] = std::ldexp(448.0f, g - 3) * ((i % 2) ? -1.0f : 0.5f);
  const auto x = bf16_of(v);
  const TokenRows q = cast_to_fp8(x.data(), 1, 640, true, true);
  ASSERT_EQ(q.format, RowFormat::kFp8Ue8m0);
  ASSERT_EQ(q.scale_columns(), 2);
  ASSERT_EQ(q.packed_scales.size(), 2u);
  EXPECT_EQ(static_cast<uint32_t>(q.packed_scales[0]), 0x7F7E7D7Cu);
  EXPECT_EQ(static_cast<uint32_t>(q.packed_scales[1]), 0x00000080u);
  for (int g = 0; g < 5; ++g) {
    EXPECT_EQ(ue8m0_unpack(q.packed_scales.data(), g), 124 + g);
    EXPECT_EQ(q.scale(0, g), std::ldexp(1.0f, g - 3));
  }
  EXPECT_EQ(ue8m0_words_per_row(128), 1);
  EXPECT_EQ(ue8m0_words_per_row(512), 1);
  EXPECT_EQ(ue8m0_words_per_row(7168), 14);
  EXPECT_EQ(ue8m0_to_scale(127), 1.0f);
  EXPECT_EQ(ue8m0_from_scale(0.5f), 126);
}

TEST(Fp8Cast, Ue8m0AndFloatScalesQuantizeIdentically) {
  const std::vector<uint16_t> x = workload::make_bf16(4 * 896, 5, 1);
  const TokenRows a = cast_to_fp8(x.data(), 4, 896, true, false);
  const TokenRows b = cast_to_fp8(x.data(), 4, 896, true, true);
  EXPECT_TRUE(testing::same_elements(a.fp8, b.fp8, 896));
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t g = 0; g < 7; ++g) EXPECT_EQ(a.scale(r, g), b.scale(r, g)) << "row " << r << " group " << g;
}

TEST(Fp8Cast, DequantizedErrorWithinHalfUlpBound) {
  // Groups of very different magnitudes, so both the normal and the denormal e4m3 range are exercised.
  const int64_t rows = 6, hidden = 1024;
  std::vector<uint16_t> x = workload::make_bf16(rows * hidden, 3, 0);
  for (int64_t i = 0; i < rows * hidden; ++i) {
    const int g = static_cast<int>((i / 128) % 5);
    x[i] = float_to_bf16(bf16_to_float(x[i]) * std::ldexp(1.0f, 6 * g - 12) * ((i % 37 == 0) ? 64.0f : 1.0f));
  }
  for (bool round_scale : {false, true}) {
    const TokenRows q = cast_to_fp8(x.data(), rows, hidden, round_scale, false);
    const std::vector<float> deq = dequantize(q);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < hidden; ++c) {
        const float v = bf16_to_float(x[r * hidden + c]);
        const float sf = q.scale(r, c / 128);
        const float bound = std::max(std::fabs(v) * 0x1.0p-4f, sf * 0x1.0p-10f) * (1.0f + 0x1.0p-18f);
        ASSERT_LE(std::fabs(deq[r * hidden + c] - v), bound)
            << "round_scale " << round_scale << " [" << r << "][" << c << "]: x " << v << ", dequant "
            << deq[r * hidden + c] << ", sf " << sf;
      }
    }
  }
}

TEST(Fp8Cast, HiddenNotMultipleOf128IsRejectedNamingHidden) {
  std::vector<uint16_t> x(200, 0);
  EXPECT_TRUE(throws_with([&] { cast_to_fp8(x.data(), 1, 200, false, false); }, {"hidden = 200", "128"}));
}

TEST(Fp8Cast, Ue8m0WithoutRoundScaleIsRejected) {
  std::vector<uint16_t> x(128, 0);
  EXPECT_TRUE(throws_with([&] { cast_to_fp8(x.data(), 1, 128, false, true); }, {"use_ue8m0", "round_scale"}));
}

TEST(TokenRows, ValidateNamesTheFieldAndSizes) {
  TokenRows r = make_token_rows(RowFormat::kFp8, 2, 256);
  r.scales.pop_back();
  EXPECT_TRUE(throws_with([&] { validate_rows(r, "x"); }, {"x.scales has 3 elements, expected 4"}));
  TokenRows b = make_token_rows(RowFormat::kBf16, 2, 100);
  EXPECT_NO_THROW(validate_rows(b, "x"));
  b.format = RowFormat::kFp8;
  EXPECT_TRUE(throws_with([&] { validate_rows(b, "x"); }, {"x.hidden = 100"}));
}

}  // namespace
}  // namespace expertlink::reference
