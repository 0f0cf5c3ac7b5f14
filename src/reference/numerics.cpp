// Numeric conversions and the per-128-channel FP8 cast of the oracle (definitions in reference.hpp).
// float_to_e4m3 is a transcription of the host path of CUDA 13's __nv_cvt_float_to_fp8 (cuda_fp8.hpp),
// E4M3 with __NV_SATFINITE, so that it agrees bit for bit with the device's cvt.rn.satfinite.e4m3x2.f32.
#include <cmath>
#include <cstring>
#include <limits>

#include "expertlink/reference.hpp"
#include "reference/checks.hpp"

namespace expertlink::reference {

using detail::ll;

namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace

float bf16_to_float(uint16_t bits) {
  return bits_float(static_cast<uint32_t>(bits) << 16);
}

uint16_t float_to_bf16(float value) {
  uint32_t u = float_bits(value);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  uint32_t remainder = u << 16;
  auto r = static_cast<uint16_t>(u >> 16);
  if (remainder > 0x80000000u || (remainder == 0x80000000u && (r & 1u))) ++r;
  return r;
}

uint8_t float_to_e4m3(float value) {
  uint32_t fbits = float_bits(value);
  if ((fbits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7F;  // canonical (positive) NaN
  const double x = static_cast<double>(value);
  uint64_t xbits;
  std::memcpy(&xbits, &x, sizeof(xbits));

  constexpr uint64_t kSignificandBits = 4;
  constexpr uint8_t kMantissaMask = 0x7;
  constexpr unsigned kExpBias = 7;
  constexpr uint64_t kMinDenormO2 = 0x3F50000000000000ull;        // 2^-10
  constexpr uint64_t kOverflowThreshold = 0x407D000000000000ull;  // 448 + half an ulp = 464
  constexpr uint8_t kMaxNorm = 0x7E;
  constexpr uint64_t kMinNorm = 0x3F90000000000000ull;  // 2^-6
  constexpr uint64_t kInfBits = 0x7FF0000000000000ull;
  constexpr uint64_t kHalfUlp = uint64_t{1} << (53 - kSignificandBits - 1);

  const auto sign = static_cast<uint8_t>((xbits >> 63) << 7);
  const auto exp = static_cast<uint8_t>((static_cast<unsigned>(xbits >> 52) & 0x7FFu) - 1023u + kExpBias);
  auto mantissa = static_cast<uint8_t>((xbits >> (53 - kSignificandBits)) & kMantissaMask);
  const uint64_t absx = xbits & 0x7FFFFFFFFFFFFFFFull;

  uint8_t res;
  if (absx <= kMinDenormO2) {
    res = 0;
  } else if (absx > kInfBits) {
    res = 0x7F;  // unreachable: NaN handled above, kept for fidelity with CUDA
  } else if (absx > kOverflowThreshold) {
    res = kMaxNorm;  // satfinite, infinities included
  } else if (absx >= kMinNorm) {
    res = static_cast<uint8_t>((exp << (kSignificandBits - 1)) | mantissa);
    const uint64_t round = xbits & ((kHalfUlp << 1) - 1);
    if (round > kHalfUlp || (round == kHalfUlp && (mantissa & 1u))) res = static_cast<uint8_t>(res + 1);
  } else {  // denormal range
    const auto shift = static_cast<uint8_t>(1u - exp);
    mantissa = static_cast<uint8_t>(mantissa | (1u << (kSignificandBits - 1)));
    res = static_cast<uint8_t>(mantissa >> shift);
    const uint64_t round = (xbits | (uint64_t{1} << 52)) & ((kHalfUlp << (shift + 1)) - 1);
    if (round > (kHalfUlp << shift) || (round == (kHalfUlp << shift) && (res & 1u)))
      res = static_cast<uint8_t>(res + 1);
  }
  return static_cast<uint8_t>(res | sign);
}

float e4m3_to_float(uint8_t bits) {
  if ((bits & 0x7F) == 0x7F) return bits_float(0x7FFFE000u);
  const float sign = (bits & 0x80) ? -1.0f : 1.0f;
  const int exp = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);
  return sign * std::ldexp(static_cast<float>(8 + mantissa), exp - 10);
}

float fp8_group_scale(const uint16_t* x, int64_t count, bool round_scale) {
  float amax = 0.0f;
  for (int64_t i = 0; i < count; ++i) amax = std::fmax(amax, std::fabs(bf16_to_float(x[i])));
  amax = std::fmax(amax, kFp8AmaxFloor);
  float sf = amax / kE4m3Max;
  if (round_scale) {
    uint32_t u = float_bits(sf);
    if ((u & 0x7F800000u) != 0x7F800000u && (u & 0x007FFFFFu) != 0) u = (u & 0xFF800000u) + 0x00800000u;
    sf = bits_float(u);
  }
  return sf;
}

void quantize_row_fp8(const uint16_t* x, int64_t hidden, bool round_scale, uint8_t* q, float* sf) {
  EL_CHECK(hidden > 0 && hidden % kFp8GroupSize == 0,
           "hidden = %lld is not a positive multiple of %d (FP8 scales cover 128 channels)", ll(hidden),
           kFp8GroupSize);
  for (int64_t g = 0; g < hidden / kFp8GroupSize; ++g) {
    const uint16_t* group = x + g * kFp8GroupSize;
    const float scale = fp8_group_scale(group, kFp8GroupSize, round_scale);
    sf[g] = scale;
    for (int i = 0; i < kFp8GroupSize; ++i)
      q[g * kFp8GroupSize + i] = float_to_e4m3(bf16_to_float(group[i]) / scale);
  }
}

uint8_t ue8m0_from_scale(float sf) {
  return static_cast<uint8_t>((float_bits(sf) >> 23) & 0xFFu);
}

float ue8m0_to_scale(uint8_t byte) {
  return byte == 0 ? bits_float(0x00400000u) : bits_float(static_cast<uint32_t>(byte) << 23);
}

uint8_t ue8m0_unpack(const int32_t* row_words, int64_t group) {
  const auto word = static_cast<uint32_t>(row_words[group / kUe8m0GroupsPerWord]);
  return static_cast<uint8_t>((word >> (8 * (group % kUe8m0GroupsPerWord))) & 0xFFu);
}

int64_t ue8m0_words_per_row(int64_t hidden) {
  const int64_t per_word = int64_t{kFp8GroupSize} * kUe8m0GroupsPerWord;
  return (hidden + per_word - 1) / per_word;
}

// ---------------------------------------------------------------------------------------------------
// TokenRows
// ---------------------------------------------------------------------------------------------------

const char* row_format_name(RowFormat format) {
  switch (format) {
    case RowFormat::kBf16:
      return "bf16";
    case RowFormat::kFp8:
      return "fp8";
    case RowFormat::kFp8Ue8m0:
      return "fp8_ue8m0";
  }
  return "unknown";
}

int64_t TokenRows::scale_columns() const {
  switch (format) {
    case RowFormat::kBf16:
      return 0;
    case RowFormat::kFp8:
      return hidden / kFp8GroupSize;
    case RowFormat::kFp8Ue8m0:
      return ue8m0_words_per_row(hidden);
  }
  return 0;
}

float TokenRows::scale(int64_t row, int64_t group) const {
  if (format == RowFormat::kFp8) return scales[row * scale_columns() + group];
  if (format == RowFormat::kFp8Ue8m0)
    return ue8m0_to_scale(ue8m0_unpack(packed_scales.data() + row * scale_columns(), group));
  return 1.0f;
}

float TokenRows::value(int64_t row, int64_t column) const {
  if (format == RowFormat::kBf16) return bf16_to_float(bf16[row * hidden + column]);
  return e4m3_to_float(fp8[row * hidden + column]) * scale(row, column / kFp8GroupSize);
}

void TokenRows::copy_row(const TokenRows& src, int64_t src_row, int64_t dst_row) {
  if (format == RowFormat::kBf16) {
    std::memcpy(&bf16[dst_row * hidden], &src.bf16[src_row * hidden], sizeof(uint16_t) * hidden);
    return;
  }
  std::memcpy(&fp8[dst_row * hidden], &src.fp8[src_row * hidden], static_cast<size_t>(hidden));
  const int64_t cols = scale_columns();
  if (format == RowFormat::kFp8)
    std::memcpy(&scales[dst_row * cols], &src.scales[src_row * cols], sizeof(float) * cols);
  else
    std::memcpy(&packed_scales[dst_row * cols], &src.packed_scales[src_row * cols], sizeof(int32_t) * cols);
}

TokenRows make_token_rows(RowFormat format, int64_t rows, int64_t hidden) {
  EL_CHECK(rows >= 0, "rows = %lld is negative", ll(rows));
  EL_CHECK(hidden > 0, "hidden = %lld is not positive", ll(hidden));
  TokenRows out;
  out.format = format;
  out.rows = rows;
  out.hidden = hidden;
  const auto n = static_cast<size_t>(rows * hidden);
  if (format == RowFormat::kBf16) {
    out.bf16.assign(n, 0);
  } else {
    EL_CHECK(hidden % kFp8GroupSize == 0, "hidden = %lld is not a multiple of %d, as FP8 rows require",
             ll(hidden), kFp8GroupSize);
    out.fp8.assign(n, 0);
    if (format == RowFormat::kFp8)
      out.scales.assign(static_cast<size_t>(rows * out.scale_columns()), 0.0f);
    else
      out.packed_scales.assign(static_cast<size_t>(rows * out.scale_columns()), 0);
  }
  return out;
}

TokenRows bf16_rows(int64_t rows, int64_t hidden, std::vector<uint16_t> data) {
  TokenRows out;
  out.rows = rows;
  out.hidden = hidden;
  out.bf16 = std::move(data);
  validate_rows(out, "x");
  return out;
}

TokenRows cast_to_fp8(const uint16_t* x, int64_t rows, int64_t hidden, bool round_scale, bool use_ue8m0) {
  EL_CHECK(!use_ue8m0 || round_scale,
           "use_ue8m0 = true requires round_scale = true (UE8M0 holds powers of two)");
  TokenRows out = make_token_rows(use_ue8m0 ? RowFormat::kFp8Ue8m0 : RowFormat::kFp8, rows, hidden);
  const int64_t groups = hidden / kFp8GroupSize;
  std::vector<float> sf(static_cast<size_t>(groups));
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row_fp8(x + r * hidden, hidden, round_scale, &out.fp8[r * hidden], sf.data());
    if (!use_ue8m0) {
      std::memcpy(&out.scales[r * groups], sf.data(), sizeof(float) * groups);
      continue;
    }
    int32_t* words = &out.packed_scales[r * out.scale_columns()];
    for (int64_t g = 0; g < groups; ++g) {
      uint32_t w = static_cast<uint32_t>(words[g / kUe8m0GroupsPerWord]);
      w |= static_cast<uint32_t>(ue8m0_from_scale(sf[g])) << (8 * (g % kUe8m0GroupsPerWord));
      words[g / kUe8m0GroupsPerWord] = static_cast<int32_t>(w);
    }
  }
  return out;
}

TokenRows cast_to_fp8(const TokenRows& bf16, bool round_scale, bool use_ue8m0) {
  validate_rows(bf16, "x");
  EL_CHECK(bf16.format == RowFormat::kBf16, "x has format %s: the FP8 cast takes bf16 rows",
           row_format_name(bf16.format));
  return cast_to_fp8(bf16.bf16.data(), bf16.rows, bf16.hidden, round_scale, use_ue8m0);
}

std::vector<float> dequantize(const TokenRows& rows) {
  validate_rows(rows, "rows");
  std::vector<float> out(static_cast<size_t>(rows.rows * rows.hidden));
  for (int64_t r = 0; r < rows.rows; ++r)
    for (int64_t c = 0; c < rows.hidden; ++c) out[r * rows.hidden + c] = rows.value(r, c);
  return out;
}

void validate_rows(const TokenRows& rows, const char* what) {
  EL_CHECK(rows.rows >= 0, "%s.rows = %lld is negative", what, ll(rows.rows));
  EL_CHECK(rows.hidden > 0, "%s.hidden = %lld is not positive", what, ll(rows.hidden));
  const int64_t n = rows.rows * rows.hidden;
  const auto expect = [&](size_t size, int64_t want, const char* field) {
    EL_CHECK(static_cast<int64_t>(size) == want,
             "%s.%s has %lld elements, expected %lld (format %s, rows = %lld, hidden = %lld)", what, field,
             ll(static_cast<int64_t>(size)), ll(want), row_format_name(rows.format), ll(rows.rows),
             ll(rows.hidden));
  };
  if (rows.format == RowFormat::kBf16) {
    expect(rows.bf16.size(), n, "bf16");
    return;
  }
  EL_CHECK(rows.hidden % kFp8GroupSize == 0,
           "%s.hidden = %lld is not a multiple of %d, as FP8 rows with per-128-channel scales require", what,
           ll(rows.hidden), kFp8GroupSize);
  expect(rows.fp8.size(), n, "fp8");
  if (rows.format == RowFormat::kFp8)
    expect(rows.scales.size(), rows.rows * rows.scale_columns(), "scales");
  else
    expect(rows.packed_scales.size(), rows.rows * rows.scale_columns(), "packed_scales");
}

std::vector<int64_t> widen_topk_idx(const std::vector<int32_t>& topk_idx) {
  return std::vector<int64_t>(topk_idx.begin(), topk_idx.end());
}

}  // namespace expertlink::reference
