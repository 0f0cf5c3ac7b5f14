// Machinery of the HT GPU tests; see ht_check.hpp.
#include "ht_check.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace expertlink::test::htt {
namespace {

struct RankInputs {
  ref::HtDispatchInput in;
  std::vector<uint16_t> y;  // expert outputs for combine, made once N is known
  std::vector<uint16_t> bias0, bias1;
};

std::vector<RankInputs> make_inputs(const HtCase& c, int R, uint64_t seed) {
  std::vector<RankInputs> all(R);
  for (int s = 0; s < R; ++s) {
    const int T = tokens_of(c, s);
    auto x = workload::make_bf16(size_t(T) * c.hidden, seed, s);
    all[s].in.x = c.fmt == Fmt::kBf16 ? ref::bf16_rows(T, c.hidden, x)
                                      : ref::cast_to_fp8(x.data(), T, c.hidden, c.fmt == Fmt::kFp8Ue8m0,
                                                         c.fmt == Fmt::kFp8Ue8m0);
    all[s].in.topk_idx =
        workload::make_topk_idx(T, c.topk, c.experts, R, c.routing, seed + 1, s, c.masked_slots);
    all[s].in.topk_weights = workload::make_topk_weights(all[s].in.topk_idx, c.topk, seed + 2, s);
    if (c.with_bias) {
      all[s].bias0 = workload::make_bf16(size_t(T) * c.hidden, seed + 3, s);
      all[s].bias1 = workload::make_bf16(size_t(T) * c.hidden, seed + 4, s);
    }
  }
  return all;
}

}  // namespace

int tokens_of(const HtCase& c, int rank) {
  return rank == c.zero_tokens_rank ? 0 : c.tokens + (rank % c.uneven_period) * c.uneven_step;
}

// One notify + dispatch + (cached dispatch) + combine round, checked. Returns 0 on success.
int run_round(const RankContext& ctx, const HtCase& c, Buffer& buffer, HtHandle& handle, uint64_t seed,
              cudaStream_t stream, bool also_cached, RoundStats* stats) {
  const int R = ctx.num_ranks, me = ctx.rank, H = c.hidden, K = c.topk;
  auto all = make_inputs(c, R, seed);
  // With a masked rank the oracle runs as if that rank had no tokens and picks of its experts were -1
  // (the live ranks' device inputs keep those picks: the kernels must drop them).
  std::vector<RankInputs> oracle_all = all;
  if (c.dead_rank >= 0) {
    HtCase without = c;
    without.zero_tokens_rank = c.dead_rank;
    oracle_all = make_inputs(without, R, seed);
    for (auto& a : oracle_all)
      for (int64_t& e : a.in.topk_idx)
        if (e >= 0 && e / (c.experts / R) == c.dead_rank) e = -1;
  }
  std::vector<ref::HtDispatchInput> ins;
  for (auto& a : oracle_all) ins.push_back(a.in);
  ref::HtDispatchParams rp;
  rp.num_experts = c.experts;
  rp.topk = K;
  rp.expert_alignment = c.expert_alignment;
  auto want = ref::ht_dispatch(rp, ins);
  const ref::HtDispatchOutput& mine_ref = want[me];
  const RankInputs& mine = all[me];
  const int T = tokens_of(c, me);
  const int64_t N = mine_ref.handle.num_recv();

  // Device inputs.
  const auto& xr = mine.in.x;
  DeviceArray<uint8_t> x_dev(
      xr.is_fp8() ? xr.fp8
                  : std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(xr.bf16.data()),
                                         reinterpret_cast<const uint8_t*>(xr.bf16.data() + xr.bf16.size())));
  DeviceArray<float> scales_dev(xr.scales);
  DeviceArray<int32_t> packed_dev(xr.packed_scales);
  std::vector<int32_t> idx32(mine.in.topk_idx.begin(), mine.in.topk_idx.end());
  DeviceArray<int64_t> idx64_dev(mine.in.topk_idx);
  DeviceArray<int32_t> idx32_dev(idx32);
  DeviceArray<float> w_dev(mine.in.topk_weights);

  HtDispatchArgs args;
  args.x = TensorView(x_dev.get(), x_dtype(c.fmt), {T, H});
  if (c.fmt == Fmt::kFp8) args.x_scales = TensorView(scales_dev.get(), DType::kF32, {T, H / 128});
  if (c.fmt == Fmt::kFp8Ue8m0)
    args.x_scales = TensorView(packed_dev.get(), DType::kI32, {T, (H + 511) / 512});
  args.topk_idx = c.idx_i32 ? TensorView(idx32_dev.get(), DType::kI32, {T, K})
                            : TensorView(idx64_dev.get(), DType::kI64, {T, K});
  args.topk_weights = TensorView(w_dev.get(), DType::kF32, {T, K});
  args.num_experts = c.experts;
  args.expert_alignment = c.expert_alignment;
  args.num_sms = c.num_sms;

  const int64_t capacity = c.sizing == Sizing::kExact ? N : N + 17;
  buffer.ht_notify(args, handle, c.sizing, capacity, stream);
  // N is on the host right after notify with exact sizing, and on the internode path whatever the sizing
  // (its notify syncs the host once); else once the stream has passed the notify (checked below).
  if (c.sizing == Sizing::kExact || buffer.num_nodes() > 1)
    GPU_EXPECT(handle.num_recv_tokens() == N, "[%s] num_recv %lld, oracle %lld", c.name,
               (long long)handle.num_recv_tokens(), (long long)N);

  const int64_t rows = std::max<int64_t>(capacity, 1);
  const int scale_cols = c.fmt == Fmt::kFp8 ? H / 128 : (H + 511) / 512;
  const size_t row_bytes = size_t(H) * (c.fmt == Fmt::kBf16 ? 2 : 1);
  DeviceArray<uint8_t> rx(c.direct ? 0 : rows * row_bytes);
  // Direct dispatch writes recv_x in the window: poisoned and read back there (before this rank's dispatch
  // starts, no peer writes into it: they wait for its dispatch kernel's "ready").
  uint8_t* const rx_ptr =
      c.direct ? static_cast<uint8_t*>(buffer.ht_window_recv_x(x_dtype(c.fmt), H).data) : rx.get();
  auto poison_rx = [&] {
    if (c.direct)
      cudaMemsetAsync(rx_ptr, 0xFF, rows * row_bytes, stream);
    else
      rx.poison();
  };
  auto download_rx = [&](int64_t bytes) {
    std::vector<uint8_t> v(bytes);
    if (bytes) cudaMemcpyAsync(v.data(), rx_ptr, bytes, cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
    return v;
  };
  DeviceArray<int32_t> rs(rows * scale_cols);
  DeviceArray<int64_t> ridx64(rows * K);
  DeviceArray<int32_t> ridx32(rows * K);
  // The received top-k weights, in the window when c.window_weights (Buffer::ht_window_recv_topk_weights):
  // poisoned and read back there, like a direct recv_x.
  DeviceArray<float> rw(c.window_weights ? 0 : rows * K);
  float* const rw_ptr =
      c.window_weights ? static_cast<float*>(buffer.ht_window_recv_topk_weights(K).data) : rw.get();
  const int E_local = c.experts / R;
  DeviceArray<int32_t> rcount(E_local);
  poison_rx();
  if (c.window_weights)
    cudaMemsetAsync(rw_ptr, 0xFF, size_t(rows) * K * sizeof(float), stream);
  else
    rw.poison();
  rs.poison(), ridx64.poison(), ridx32.poison(), rcount.poison();

  HtDispatchOutputs out;
  out.recv_x = TensorView(rx_ptr, x_dtype(c.fmt), {rows, H});
  if (c.fmt != Fmt::kBf16)
    out.recv_x_scales =
        TensorView(rs.get(), c.fmt == Fmt::kFp8 ? DType::kF32 : DType::kI32, {rows, scale_cols});
  out.recv_topk_idx = c.idx_i32 ? TensorView(ridx32.get(), DType::kI32, {rows, K})
                                : TensorView(ridx64.get(), DType::kI64, {rows, K});
  out.recv_topk_weights = TensorView(rw_ptr, DType::kF32, {rows, K});
  out.num_recv_tokens_per_expert = TensorView(rcount.get(), DType::kI32, {E_local});
  buffer.ht_dispatch(args, handle, out, stream);
  buffer.synchronize(stream);
  handle.check_capacity();
  GPU_EXPECT(handle.num_recv_tokens() == N, "[%s] num_recv %lld after the stream, oracle %lld", c.name,
             (long long)handle.num_recv_tokens(), (long long)N);

  // ---- dispatch, bitwise ----
  auto got_x = download_rx(N * row_bytes);
  const auto& wx = mine_ref.x;
  const uint8_t* want_x = wx.is_fp8() ? wx.fp8.data() : reinterpret_cast<const uint8_t*>(wx.bf16.data());
  for (int64_t i = 0; i < int64_t(N * row_bytes); ++i) {
    if (got_x[i] != want_x[i]) {
      GPU_EXPECT(false,
                 "[%s] recv_x row %lld byte %lld: expected 0x%02x, got 0x%02x (source rank %d token %d)",
                 c.name, (long long)(i / row_bytes), (long long)(i % row_bytes), want_x[i], got_x[i],
                 mine_ref.handle.recv_src_rank[i / row_bytes], mine_ref.handle.recv_src_token[i / row_bytes]);
    }
  }
  if (c.fmt != Fmt::kBf16) {
    auto got_s = rs.download(N * scale_cols);
    const int32_t* want_s =
        c.fmt == Fmt::kFp8 ? reinterpret_cast<const int32_t*>(wx.scales.data()) : wx.packed_scales.data();
    for (int64_t i = 0; i < N * scale_cols; ++i)
      GPU_EXPECT(got_s[i] == want_s[i], "[%s] recv_x_scales row %lld col %lld: expected 0x%08x, got 0x%08x",
                 c.name, (long long)(i / scale_cols), (long long)(i % scale_cols), want_s[i], got_s[i]);
  }
  {
    std::vector<int64_t> got_idx(N * K);
    if (c.idx_i32) {
      auto g = ridx32.download(N * K);
      std::copy(g.begin(), g.end(), got_idx.begin());
    } else {
      got_idx = ridx64.download(N * K);
    }
    std::vector<float> got_w(N * K);
    if (N) cudaMemcpyAsync(got_w.data(), rw_ptr, N * K * sizeof(float), cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
    for (int64_t i = 0; i < N * K; ++i) {
      GPU_EXPECT(got_idx[i] == mine_ref.topk_idx[i],
                 "[%s] recv_topk_idx[%lld][%lld]: expected %lld, got %lld", c.name, (long long)(i / K),
                 (long long)(i % K), (long long)mine_ref.topk_idx[i], (long long)got_idx[i]);
      GPU_EXPECT(std::memcmp(&got_w[i], &mine_ref.topk_weights[i], 4) == 0,
                 "[%s] recv_topk_weights[%lld][%lld]: expected %g, got %g", c.name, (long long)(i / K),
                 (long long)(i % K), mine_ref.topk_weights[i], got_w[i]);
    }
    DeviceArray<int32_t> src_tok_copy(0);
    std::vector<int32_t> got_src(N);
    if (N) cudaMemcpy(got_src.data(), handle.recv_src_token(), N * 4, cudaMemcpyDeviceToHost);
    for (int64_t i = 0; i < N; ++i)
      GPU_EXPECT(got_src[i] == mine_ref.handle.recv_src_token[i],
                 "[%s] recv_src_token[%lld]: expected %d, got %d", c.name, (long long)i,
                 mine_ref.handle.recv_src_token[i], got_src[i]);
    std::vector<int32_t> got_prefix(R + 1);
    cudaMemcpy(got_prefix.data(), handle.rank_prefix(), (R + 1) * 4, cudaMemcpyDeviceToHost);
    for (int s = 0; s <= R; ++s)
      GPU_EXPECT(got_prefix[s] == mine_ref.handle.rank_prefix[s], "[%s] rank_prefix[%d]: expected %d, got %d",
                 c.name, s, mine_ref.handle.rank_prefix[s], got_prefix[s]);
    auto got_count = rcount.download();
    auto host_count = handle.num_recv_tokens_per_expert();
    for (int j = 0; j < E_local; ++j) {
      GPU_EXPECT(got_count[j] == mine_ref.num_recv_tokens_per_expert[j],
                 "[%s] num_recv_tokens_per_expert[%d]: expected %d, got %d", c.name, j,
                 mine_ref.num_recv_tokens_per_expert[j], got_count[j]);
      GPU_EXPECT(host_count[j] == mine_ref.num_recv_tokens_per_expert[j],
                 "[%s] host per-expert count [%d]: expected %d, got %d", c.name, j,
                 mine_ref.num_recv_tokens_per_expert[j], host_count[j]);
    }
  }

  // ---- cached dispatch: new data along the same handle, no notify ----
  if (also_cached && c.fmt == Fmt::kBf16) {
    std::vector<ref::TokenRows> xs;
    std::vector<ref::HtHandle> handles;
    for (int s = 0; s < R; ++s) {
      const int Ts = s == c.dead_rank ? 0 : tokens_of(c, s);
      xs.push_back(ref::bf16_rows(Ts, H, workload::make_bf16(size_t(Ts) * H, seed + 9, s)));
      handles.push_back(want[s].handle);
    }
    auto want_cached = ref::ht_dispatch_cached(handles, xs);
    DeviceArray<uint16_t> x2(xs[me].bf16);
    HtDispatchArgs a2;
    a2.x = TensorView(x2.get(), DType::kBF16, {T, H});
    a2.num_sms = c.num_sms;
    poison_rx();
    HtDispatchOutputs o2;
    o2.recv_x = out.recv_x;
    buffer.ht_dispatch(a2, handle, o2, stream);
    buffer.synchronize(stream);
    auto g2 = download_rx(N * row_bytes);
    int64_t d = first_diff(
        g2,
        std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(want_cached[me].bf16.data()),
                             reinterpret_cast<const uint8_t*>(want_cached[me].bf16.data()) + N * row_bytes),
        N * row_bytes);
    GPU_EXPECT(d < 0, "[%s] cached dispatch recv_x row %lld differs", c.name, (long long)(d / row_bytes));
  }

  // ---- combine: random expert outputs per received row, back to the sources ----
  std::vector<ref::HtCombineInput> cins(R);
  for (int d = 0; d < R; ++d) {
    cins[d].x = workload::make_bf16(size_t(want[d].handle.num_recv()) * H, seed + 5, d);
    cins[d].topk_weights = want[d].topk_weights;
    cins[d].bias0 = oracle_all[d].bias0;
    cins[d].bias1 = oracle_all[d].bias1;
  }
  std::vector<ref::HtHandle> handles;
  for (auto& w : want) handles.push_back(w.handle);
  auto want_comb = ref::ht_combine_explicit(handles, cins, H, /*sum_topk_weights=*/true);
  // In capacity sizing the expert outputs have the capacity's rows (only the first N are read).
  DeviceArray<uint16_t> y(c.direct_combine ? 0 : size_t(rows) * H), b0(all[me].bias0), b1(all[me].bias1);
  uint16_t* const y_ptr =
      c.direct_combine ? static_cast<uint16_t*>(buffer.ht_window_recv_x(DType::kBF16, H).data) : y.get();
  if (c.direct_combine) {  // the expert outputs over the received rows, in the window
    cudaMemsetAsync(y_ptr, 0xFF, size_t(rows) * H * 2, stream);
    if (N) cudaMemcpyAsync(y_ptr, cins[me].x.data(), size_t(N) * H * 2, cudaMemcpyHostToDevice, stream);
    cudaStreamSynchronize(stream);
  } else {
    y.poison();
    y.upload(cins[me].x);
  }
  DeviceArray<uint16_t> comb(size_t(T) * H);
  DeviceArray<float> comb_w(size_t(T) * K);
  comb.poison(), comb_w.poison();
  HtCombineArgs ca;
  const int64_t y_rows = c.sizing == Sizing::kExact ? N : rows;
  ca.x = TensorView(y_ptr, DType::kBF16, {y_rows, H});
  if (c.combine_weights) ca.topk_weights = TensorView(rw_ptr, DType::kF32, {y_rows, K});
  if (c.with_bias) {
    ca.bias0 = TensorView(b0.get(), DType::kBF16, {T, H});
    ca.bias1 = TensorView(b1.get(), DType::kBF16, {T, H});
  }
  ca.num_sms = c.num_sms;
  HtCombineOutputs co;
  co.combined_x = TensorView(comb.get(), DType::kBF16, {T, H});
  if (c.combine_weights) co.combined_topk_weights = TensorView(comb_w.get(), DType::kF32, {T, K});
  buffer.ht_combine(ca, handle, co, stream);
  buffer.synchronize(stream);
  if (c.direct_combine) {  // every rank past its combine before any rank touches its region again
    buffer.barrier(stream);
    buffer.synchronize(stream);
  }
  auto got_c = comb.download();
  auto got_cw = comb_w.download();
  int64_t inexact = 0;
  for (int64_t i = 0; i < int64_t(T) * H; ++i) {
    const float g = ref::bf16_to_float(got_c[i]), w = ref::bf16_to_float(want_comb[me].x[i]);
    if (got_c[i] != want_comb[me].x[i]) ++inexact;
    GPU_EXPECT(std::fabs(g - w) <= 2e-2f * std::fabs(w) + 2e-2f,
               "[%s] combined_x[%lld][%lld]: expected %g, got %g", c.name, (long long)(i / H),
               (long long)(i % H), w, g);
    GPU_EXPECT(!c.combine_bitwise || got_c[i] == want_comb[me].x[i],
               "[%s] combined_x[%lld][%lld]: expected bits 0x%04x (%g), got 0x%04x (%g): the kernels must "
               "sum in the "
               "oracle's order",
               c.name, (long long)(i / H), (long long)(i % H), want_comb[me].x[i], w, got_c[i], g);
  }
  // Each slot's weight comes from the one rank of its expert (the others add 0): its sum is exact.
  const std::vector<float>& want_cw = want_comb[me].topk_weights;
  for (int64_t i = 0; i < (c.combine_weights ? int64_t(T) * K : 0); ++i)
    GPU_EXPECT(c.combine_bitwise ? std::memcmp(&got_cw[i], &want_cw[i], 4) == 0
                                 : std::fabs(got_cw[i] - want_cw[i]) <= 1e-6f,
               "[%s] combined_topk_weights[%lld][%lld]: expected %g, got %g", c.name, (long long)(i / K),
               (long long)(i % K), want_cw[i], got_cw[i]);
  if (stats != nullptr) *stats = RoundStats{T, N, inexact};
  return 0;
}

}  // namespace expertlink::test::htt
