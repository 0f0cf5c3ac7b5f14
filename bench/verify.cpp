#include "verify.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>

#include "bench_kernels.hpp"
#include "check.hpp"
#include "device_buffer.hpp"
#include "timing.hpp"

namespace expertlink::bench {
namespace {

template <typename T>
DeviceBuffer upload(const std::vector<T>& v, cudaStream_t stream) {
  DeviceBuffer buf(v.size() * sizeof(T));
  if (!v.empty())
    EL_CUDA_CHECK(cudaMemcpyAsync(buf.as(), v.data(), buf.bytes(), cudaMemcpyHostToDevice, stream));
  return buf;
}

// Positions, when given, must name one row per id.
void check_positions(const std::vector<int64_t>& positions, size_t ids, const char* what) {
  EL_CHECK(positions.empty() || positions.size() == ids, "%s: %zu positions for %zu rows", what,
           positions.size(), ids);
}

template <typename T>
T read_one(const void* device_ptr) {
  T v{};
  EL_CUDA_CHECK(cudaMemcpy(&v, device_ptr, sizeof v, cudaMemcpyDeviceToHost));
  return v;
}

float fp8_e4m3_to_float(uint8_t bits) {
  int sign = bits >> 7, exp = (bits >> 3) & 0xf, man = bits & 7;
  float v = exp == 0 ? std::ldexp(static_cast<float>(man) / 8.0f, -6)
                     : std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
  if (exp == 0xf && man == 7) v = NAN;
  return sign ? -v : v;
}

std::string describe_row(const RowId& id) {
  char buf[128];
  if (id.slot < 0)
    std::snprintf(buf, sizeof buf, "(source rank %d, token %d)", id.src_rank, id.token);
  else
    std::snprintf(buf, sizeof buf, "(source rank %d, token %d, slot %d, expert %d)", id.src_rank, id.token,
                  id.slot, id.expert);
  return buf;
}

}  // namespace

void fill_expert_outputs(const ExpertOutputs& out, const CaseData& data, cudaStream_t stream) {
  if (out.ids.empty()) return;
  EL_CHECK(out.rows != nullptr, "prepare() returned %zu expert-output ids but no rows", out.ids.size());
  check_positions(out.positions, out.ids.size(), "prepare()'s expert outputs");
  DeviceBuffer ids = upload(out.ids, stream), positions = upload(out.positions, stream);
  const Inputs& in = data.inputs();
  launch_fill_expert_outputs(out.rows, ids.as<RowId>(), positions.as<int64_t>(),
                             static_cast<int64_t>(out.ids.size()), data.all_x_bf16(), in.tokens, in.hidden,
                             in.family, in.rank, stream);
  wait_stream(stream, 120.0, "the expert outputs' fill");  // `ids` and `positions` are freed on return
}

CheckResult check_dispatch(Op op, const DispatchView& view, const CaseData& data, cudaStream_t stream,
                           double wait_timeout_s) {
  CheckResult res;
  const Inputs& in = data.inputs();
  const int64_t n = static_cast<int64_t>(view.ids.size());
  if (view.rows_received != n) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "rank %d received %lld rows, the routing says %lld", in.rank,
                  static_cast<long long>(view.rows_received), static_cast<long long>(n));
    return CheckResult{false, 1, buf};
  }
  RowsToCheck c{};
  c.mode = view.format == RowFormat::kBf16 ? CheckMode::kBf16Exact
           : op == Op::kHtDispatchFp8      ? CheckMode::kFp8Exact
                                           : CheckMode::kFp8FromBf16;
  c.data = view.data;
  c.data_stride = view.data_stride;
  c.scales = view.scales;
  c.scales_stride = view.scales_stride;
  c.meta = view.meta;
  c.meta_stride = view.meta_stride;
  check_positions(view.positions, view.ids.size(), "dispatch_view()");
  DeviceBuffer ids = upload(view.ids, stream), positions = upload(view.positions, stream);
  c.ids = ids.as<RowId>();
  c.positions = positions.as<int64_t>();
  c.n = n;
  c.tokens = in.tokens;
  c.hidden = in.hidden;
  c.all_x_bf16 = data.all_x_bf16();
  c.all_x_fp8 = data.all_x_fp8();
  c.all_x_scales = data.all_x_scales();
  DeviceBuffer result(sizeof(RowCheck));
  launch_check_rows(c, result.as<RowCheck>(), stream);
  wait_stream(stream, wait_timeout_s, "the dispatch check");
  RowCheck rc = read_one<RowCheck>(result.as());
  if (rc.count == 0) return res;

  res.ok = false;
  res.mismatches = static_cast<long long>(rc.count);
  const int64_t row = static_cast<int64_t>(rc.first >> 32),
                col = static_cast<int64_t>(rc.first & 0xffffffffu);
  const RowId& id = view.ids[static_cast<size_t>(row)];
  const int64_t at = view.positions.empty() ? row : view.positions[static_cast<size_t>(row)];
  const int64_t src_row = static_cast<int64_t>(id.src_rank) * in.tokens + id.token;
  const int64_t groups = in.hidden / 128;
  char buf[512];
  if (col == in.hidden + groups) {
    int32_t m[4];
    EL_CUDA_CHECK(cudaMemcpy(m, view.meta + at * view.meta_stride, sizeof m, cudaMemcpyDeviceToHost));
    std::snprintf(buf, sizeof buf,
                  "source info: expected {token %d, slot %d, expert %d, rank %d}, got {%d, %d, %d, %d}",
                  id.token, id.slot, id.expert, id.src_rank, m[0], m[1], m[2], m[3]);
  } else if (col >= in.hidden) {
    float want = read_one<float>(data.all_x_scales() + src_row * groups + (col - in.hidden));
    float got = read_one<float>(view.scales + at * view.scales_stride + (col - in.hidden));
    std::snprintf(buf, sizeof buf, "scale %lld: expected %g, got %g", static_cast<long long>(col - in.hidden),
                  want, got);
  } else if (c.mode == CheckMode::kBf16Exact) {
    uint16_t want = read_one<uint16_t>(data.all_x_bf16() + src_row * in.hidden + col);
    uint16_t got = read_one<uint16_t>(view.data + at * view.data_stride + col * 2);
    std::snprintf(buf, sizeof buf, "column %lld: expected %g (0x%04x), got %g (0x%04x)",
                  static_cast<long long>(col), bf16_to_float(want), want, bf16_to_float(got), got);
  } else if (c.mode == CheckMode::kFp8Exact) {
    uint8_t want = read_one<uint8_t>(data.all_x_fp8() + src_row * in.hidden + col);
    uint8_t got = read_one<uint8_t>(view.data + at * view.data_stride + col);
    std::snprintf(buf, sizeof buf, "column %lld: expected e4m3 0x%02x, got 0x%02x",
                  static_cast<long long>(col), want, got);
  } else {
    uint16_t want = read_one<uint16_t>(data.all_x_bf16() + src_row * in.hidden + col);
    uint8_t got = read_one<uint8_t>(view.data + at * view.data_stride + col);
    float scale = read_one<float>(view.scales + at * view.scales_stride + col / 128);
    std::snprintf(buf, sizeof buf, "column %lld: expected about %g, got e4m3 0x%02x x scale %g = %g",
                  static_cast<long long>(col), bf16_to_float(want), got, scale,
                  fp8_e4m3_to_float(got) * scale);
  }
  res.first = "row " + std::to_string(row) + (at != row ? " (at " + std::to_string(at) + ")" : "") + " " +
              describe_row(id) + " " + buf;
  return res;
}

CheckResult check_combine(Op op, const uint16_t* out, const CaseData& data, cudaStream_t stream,
                          double wait_timeout_s) {
  const Inputs& in = data.inputs();
  const Routings& rt = data.routings();
  const std::vector<int64_t>& idx = rt.topk_all[static_cast<size_t>(in.rank)];
  const std::vector<uint16_t>& x = data.x_host();
  const std::vector<float>& w = data.weights_host();
  std::vector<uint16_t> got(static_cast<size_t>(in.tokens * in.hidden));
  wait_stream(stream, wait_timeout_s, "the combine");
  if (!got.empty())
    EL_CUDA_CHECK(cudaMemcpy(got.data(), out, got.size() * sizeof(uint16_t), cudaMemcpyDeviceToHost));

  // Terms of each token: (factor, weight) per row that comes back. HT: one per distinct destination rank,
  // unweighted; LL: one per valid selection, weighted.
  const int per_rank = rt.experts_per_rank();
  std::vector<std::pair<float, float>> terms;
  CheckResult res;
  for (int64_t t = 0; t < in.tokens; ++t) {
    terms.clear();
    const int64_t* row = idx.data() + t * in.topk;
    if (in.family == Family::kHt) {
      uint64_t seen = 0;
      for (int k = 0; k < in.topk; ++k)
        if (row[k] >= 0) seen |= uint64_t{1} << (row[k] / per_rank);
      for (int r = 0; r < in.num_ranks; ++r)
        if (seen >> r & 1u) terms.emplace_back(expert_output_factor(Family::kHt, r, -1), 1.0f);
    } else {
      for (int k = 0; k < in.topk; ++k)
        if (row[k] >= 0)
          terms.emplace_back(expert_output_factor(Family::kLl, -1, static_cast<int>(row[k])),
                             w[static_cast<size_t>(t * in.topk + k)]);
    }
    for (int64_t h = 0; h < in.hidden; ++h) {
      const size_t i = static_cast<size_t>(t * in.hidden + h);
      const float xv = bf16_to_float(x[i]);
      float sum = 0.0f, mag = 0.0f;
      for (const auto& [factor, weight] : terms) {
        float y = bf16_to_float(float_to_bf16(xv * factor)) * weight;
        sum += y;
        mag += std::fabs(y);
      }
      const uint16_t want_bits = float_to_bf16(sum);
      const float want = bf16_to_float(want_bits);
      const float g = bf16_to_float(got[i]);
      if (got[i] != want_bits) ++res.inexact;
      // Order of summation may differ between implementations; the result is rounded to BF16 once.
      if (!(std::fabs(g - want) <= mag * (1.0f / 128.0f) + 1e-30f)) {
        if (res.ok) {
          char buf[256];
          std::snprintf(buf, sizeof buf, "token %lld column %lld (%zu rows summed): expected %g, got %g",
                        static_cast<long long>(t), static_cast<long long>(h), terms.size(), want, g);
          res.first = buf;
        }
        res.ok = false;
        ++res.mismatches;
      }
    }
  }
  return res;
}

}  // namespace expertlink::bench
