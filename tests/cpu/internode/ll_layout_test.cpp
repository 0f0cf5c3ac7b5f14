// The internode LL path's host arithmetic (src/internode/ll_layout.hpp): every call that
// Buffer::ll_size_hint covers fits the staging areas in both directions, the pair layout is aligned and
// non-overlapping, and a byte-level simulation of the pair protocol (route words, meta counts, headers,
// unpack prefix) reproduces the oracle's expert-major order for every rank.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "expertlink/buffer.hpp"
#include "expertlink/reference.hpp"
#include "expertlink/workload.hpp"
#include "internode/ll_layout.hpp"
#include "kernels/ll_kernels.hpp"

namespace expertlink::internode {
namespace {

TEST(InternodeLlLayout, EveryHintedShapeFitsBothDirections) {
  for (int R : {2, 4, 8, 16, 64})
    for (int N : {1, 7, 128, 1024})
      for (int H : {128, 2880, 7168, 16384})
        for (int E : {R, 4 * R, 1024 / R * R}) {
          const size_t hint = Buffer::ll_size_hint(R, N, H, E);
          const int64_t area = ll_area_bytes(static_cast<int64_t>(hint));
          // The intranode kernels see the same area size.
          EXPECT_EQ(
              area,
              kernels::ll_geometry(R, N, H, 8, E, false, false, 0, static_cast<int64_t>(hint)).area_bytes);
          for (int K : {1, 8, 16})
            for (int fmt = 0; fmt < 3; ++fmt) {  // BF16, FP8 f32 scales, FP8 UE8M0
              const bool fp8 = fmt > 0 && H % 128 == 0;
              const LlLayout l = make_ll_layout(R, N, H, K, E, fp8, fmt == 2 && fp8);
              SCOPED_TRACE(::testing::Message() << "R=" << R << " N=" << N << " H=" << H << " E=" << E
                                                << " K=" << K << " fmt=" << fmt);
              EXPECT_LE(l.dispatch_bytes(), area);
              EXPECT_LE(l.combine_bytes(), area);
              for (int64_t v : {l.meta_bytes, l.msg_bytes, l.dispatch_pair, l.valid_offset, l.weight_pair,
                                l.partial_pair, l.partial_offset})
                EXPECT_EQ(v % 16, 0);
              EXPECT_GE(l.meta_bytes, 4 * (4 + E / R));
              EXPECT_GE(l.header_offset, l.row_bytes + 4 * l.scale_cols);
              EXPECT_LE(l.header_offset + 4 * K, l.msg_bytes);
              EXPECT_GE(l.valid_offset, 4LL * N * K);
              EXPECT_GE(l.weight_pair, l.valid_offset + 4LL * N);
            }
        }
}

TEST(InternodeLlLayout, DeepSeekDecodeShape) {
  // R = 16, N = 128, H = 7168, top-8 of 256, FP8 with float scales.
  const LlLayout l = make_ll_layout(16, 128, 7168, 8, 256, true, false);
  EXPECT_EQ(l.meta_bytes, 80);  // 4 + 16 words, padded
  EXPECT_EQ(l.scale_cols, 56);
  EXPECT_EQ(l.msg_bytes, 7424);  // 7168 + 224 + 32
  EXPECT_EQ(l.dispatch_pair, 80 + 128 * 7424);
  EXPECT_EQ(l.weight_pair, 4096 + 512);
  EXPECT_EQ(l.partial_pair, 128 * 14336);
  const LlLayout u = make_ll_layout(16, 128, 7168, 8, 256, true, true);
  EXPECT_EQ(u.scale_cols, 14);
  EXPECT_EQ(u.msg_bytes, 7168 + 64 + 32);
}

// The dispatch as the kernels do it, on the host, with BF16 rows: route (pos per expert, header words,
// meta counts), pack (rows into the pairs of ranks holding an expert, headers into every pair), unpack
// (begin = prefix over sources of the counts; row at begin + pos for each non-duplicate pick).
void simulate_and_compare(int R, int N, int H, int K, int E, const std::vector<int>& tokens, uint64_t seed) {
  namespace ref = expertlink::reference;
  const int EL = E / R;
  const LlLayout l = make_ll_layout(R, N, H, K, E, false, false);
  std::vector<ref::LlDispatchInput> in(R);
  for (int s = 0; s < R; ++s) {
    in[s].num_tokens = tokens[s];
    in[s].x = workload::make_bf16(size_t(tokens[s]) * H, seed, s);
    in[s].topk_idx = workload::make_topk_idx(tokens[s], K, E, R, workload::Routing::kUniform, seed + 1, s,
                                             tokens[s] * K / 5);
    for (int t = 2; t < tokens[s] && K >= 2; t += 5)  // repeated experts
      in[s].topk_idx[size_t(t) * K + 1] = in[s].topk_idx[size_t(t) * K];
  }
  // pairs[s][d]: what s sends d.
  std::vector<std::vector<std::vector<char>>> pairs(R, std::vector<std::vector<char>>(R));
  for (int s = 0; s < R; ++s) {
    const int T = tokens[s];
    const auto& idx = in[s].topk_idx;
    for (int d = 0; d < R; ++d) pairs[s][d].assign(size_t(l.dispatch_pair), char(0x5A));
    std::vector<int32_t> words(size_t(T) * K, -1);
    for (int e = 0; e < E; ++e) {
      int count = 0;
      for (int t = 0; t < T; ++t) {
        int first = -1;
        for (int k = 0; k < K; ++k)
          if (first < 0 && idx[size_t(t) * K + k] == e) first = k;
        if (first < 0) continue;
        for (int k = first; k < K; ++k)
          if (idx[size_t(t) * K + k] == e)
            words[size_t(t) * K + k] = (e % EL) | (count << 10) | (int(k != first) << 30);
        ++count;
      }
      int32_t* meta = reinterpret_cast<int32_t*>(pairs[s][e / EL].data());
      meta[4 + e % EL] = count;
      if (e % EL == 0) meta[0] = T, meta[1] = H, meta[2] = K, meta[3] = E;
    }
    for (int t = 0; t < T; ++t)
      for (int d = 0; d < R; ++d) {
        char* msg = pairs[s][d].data() + l.meta_bytes + int64_t(t) * l.msg_bytes;
        bool holds = false;
        for (int k = 0; k < K; ++k) {
          const int64_t e = idx[size_t(t) * K + k];
          const bool here = e >= 0 && e / EL == d;
          holds = holds || here;
          reinterpret_cast<int32_t*>(msg + l.header_offset)[k] = here ? words[size_t(t) * K + k] : -1;
        }
        if (holds) std::memcpy(msg, &in[s].x[size_t(t) * H], size_t(l.row_bytes));
      }
  }
  ref::LlDispatchParams p;
  p.num_experts = E;
  p.hidden = H;
  p.topk = K;
  p.num_max_dispatch_tokens_per_rank = N;
  p.use_fp8 = false;
  const auto want = ref::ll_dispatch(p, in);
  const int64_t slots = int64_t(R) * N;
  for (int d = 0; d < R; ++d) {
    std::vector<int> begin(size_t(EL) * R);
    for (int j = 0; j < EL; ++j) {
      int acc = 0;
      for (int s = 0; s < R; ++s) {
        begin[j * R + s] = acc;
        acc += reinterpret_cast<const int32_t*>(pairs[s][d].data())[4 + j];
      }
      ASSERT_EQ(acc, want[d].handle.recv_count[j]) << "rank " << d << " expert " << j;
    }
    std::vector<uint16_t> rows(size_t(EL) * slots * H, 0xFFFF);
    std::vector<int32_t> src(size_t(EL) * slots, -1);
    for (int s = 0; s < R; ++s) {
      const char* pair = pairs[s][d].data();
      const int T = reinterpret_cast<const int32_t*>(pair)[0];
      for (int t = 0; t < T; ++t) {
        const char* msg = pair + l.meta_bytes + int64_t(t) * l.msg_bytes;
        for (int k = 0; k < K; ++k) {
          const int32_t h = reinterpret_cast<const int32_t*>(msg + l.header_offset)[k];
          if (h < 0 || ((h >> 30) & 1)) continue;
          const int j = h & 0x3FF, row = begin[j * R + s] + ((h >> 10) & 0x3FF);
          std::memcpy(&rows[(j * slots + row) * H], msg, size_t(l.row_bytes));
          src[j * slots + row] = t;
        }
      }
    }
    for (int j = 0; j < EL; ++j)
      for (int i = 0; i < want[d].handle.recv_count[j]; ++i) {
        const int64_t row = j * slots + i;
        ASSERT_EQ(src[row], want[d].handle.src_token[row])
            << "rank " << d << " expert " << j << " slot " << i;
        ASSERT_EQ(0, std::memcmp(&rows[row * H], &want[d].x.bf16[row * H], size_t(H) * 2))
            << "rank " << d << " expert " << j << " slot " << i;
      }
  }
}

TEST(InternodeLlLayout, PairProtocolGivesTheOraclesOrder) {
  simulate_and_compare(2, 16, 64, 4, 8, {16, 9}, 11);
  simulate_and_compare(4, 32, 128, 8, 32, {32, 0, 17, 1}, 12);
  simulate_and_compare(3, 8, 256, 6, 12, {0, 0, 8}, 13);
  simulate_and_compare(8, 64, 64, 8, 64, {64, 63, 1, 0, 40, 64, 2, 33}, 14);
}

}  // namespace
}  // namespace expertlink::internode
