// HT dispatch/combine on all local GPUs, checked against the CPU oracle: dispatch bitwise (it is a copy),
// combine within a float tolerance (the kernels sum in the oracle's order, so it is exact in practice).
// Every rank builds every rank's inputs from the run seed, so each can run the oracle for the whole group.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "device_array.hpp"
#include "expertlink/buffer.hpp"
#include "expertlink/reference.hpp"
#include "expertlink/workload.hpp"
#include "harness.hpp"

namespace expertlink::test {
namespace {

namespace ref = expertlink::reference;
using workload::Routing;

enum class Fmt { kBf16, kFp8, kFp8Ue8m0 };

struct HtCase {
  const char* name;
  int tokens;             // per rank (rank 1 may get zero_tokens_rank)
  int hidden, topk, experts;
  Fmt fmt = Fmt::kBf16;
  bool idx_i32 = false;
  Routing routing = Routing::kUniform;
  int masked_slots = 0;
  int expert_alignment = 1;
  Sizing sizing = Sizing::kExact;
  int zero_tokens_rank = -1;  // this rank has no tokens
  bool with_bias = true;
  int num_sms = 0;
};

struct RankInputs {
  ref::HtDispatchInput in;
  std::vector<uint16_t> y;  // expert outputs for combine, made once N is known
  std::vector<uint16_t> bias0, bias1;
};

int tokens_of(const HtCase& c, int rank) { return rank == c.zero_tokens_rank ? 0 : c.tokens + (rank % 2) * 3; }

std::vector<RankInputs> make_inputs(const HtCase& c, int R, uint64_t seed) {
  std::vector<RankInputs> all(R);
  for (int s = 0; s < R; ++s) {
    const int T = tokens_of(c, s);
    auto x = workload::make_bf16(size_t(T) * c.hidden, seed, s);
    all[s].in.x = c.fmt == Fmt::kBf16 ? ref::bf16_rows(T, c.hidden, x)
                                     : ref::cast_to_fp8(x.data(), T, c.hidden, c.fmt == Fmt::kFp8Ue8m0, c.fmt == Fmt::kFp8Ue8m0);
    all[s].in.topk_idx = workload::make_topk_idx(T, c.topk, c.experts, R, c.routing, seed + 1, s, c.masked_slots);
    all[s].in.topk_weights = workload::make_topk_weights(all[s].in.topk_idx, c.topk, seed + 2, s);
    if (c.with_bias) {
      all[s].bias0 = workload::make_bf16(size_t(T) * c.hidden, seed + 3, s);
      all[s].bias1 = workload::make_bf16(size_t(T) * c.hidden, seed + 4, s);
    }
  }
  return all;
}

DType x_dtype(Fmt f) { return f == Fmt::kBf16 ? DType::kBF16 : DType::kFP8E4M3; }

// First differing element of two equal-length arrays, or -1.
template <typename A, typename B>
int64_t first_diff(const std::vector<A>& got, const std::vector<B>& want, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(A)) != 0) return static_cast<int64_t>(i);
  return -1;
}

// One notify + dispatch + (cached dispatch) + combine round, checked. Returns 0 on success.
int run_round(const RankContext& ctx, const HtCase& c, Buffer& buffer, HtHandle& handle, uint64_t seed,
              cudaStream_t stream, bool also_cached) {
  const int R = ctx.num_ranks, me = ctx.rank, H = c.hidden, K = c.topk;
  auto all = make_inputs(c, R, seed);
  std::vector<ref::HtDispatchInput> ins;
  for (auto& a : all) ins.push_back(a.in);
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
  DeviceArray<uint8_t> x_dev(xr.is_fp8() ? xr.fp8 : std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(xr.bf16.data()),
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
  if (c.fmt == Fmt::kFp8Ue8m0) args.x_scales = TensorView(packed_dev.get(), DType::kI32, {T, (H + 511) / 512});
  args.topk_idx = c.idx_i32 ? TensorView(idx32_dev.get(), DType::kI32, {T, K}) : TensorView(idx64_dev.get(), DType::kI64, {T, K});
  args.topk_weights = TensorView(w_dev.get(), DType::kF32, {T, K});
  args.num_experts = c.experts;
  args.expert_alignment = c.expert_alignment;
  args.num_sms = c.num_sms;

  const int64_t capacity = c.sizing == Sizing::kExact ? N : N + 17;
  buffer.ht_notify(args, handle, c.sizing, capacity, stream);
  if (c.sizing == Sizing::kExact) GPU_EXPECT(handle.num_recv_tokens() == N, "num_recv %lld, oracle %lld", (long long)handle.num_recv_tokens(), (long long)N);

  const int64_t rows = std::max<int64_t>(capacity, 1);
  const int scale_cols = c.fmt == Fmt::kFp8 ? H / 128 : (H + 511) / 512;
  const size_t row_bytes = size_t(H) * (c.fmt == Fmt::kBf16 ? 2 : 1);
  DeviceArray<uint8_t> rx(rows * row_bytes);
  DeviceArray<int32_t> rs(rows * scale_cols);
  DeviceArray<int64_t> ridx64(rows * K);
  DeviceArray<int32_t> ridx32(rows * K);
  DeviceArray<float> rw(rows * K);
  const int E_local = c.experts / R;
  DeviceArray<int32_t> rcount(E_local);
  for (auto* p : {&rx}) p->poison();
  rs.poison(), ridx64.poison(), ridx32.poison(), rw.poison(), rcount.poison();

  HtDispatchOutputs out;
  out.recv_x = TensorView(rx.get(), x_dtype(c.fmt), {rows, H});
  if (c.fmt != Fmt::kBf16) out.recv_x_scales = TensorView(rs.get(), c.fmt == Fmt::kFp8 ? DType::kF32 : DType::kI32, {rows, scale_cols});
  out.recv_topk_idx = c.idx_i32 ? TensorView(ridx32.get(), DType::kI32, {rows, K}) : TensorView(ridx64.get(), DType::kI64, {rows, K});
  out.recv_topk_weights = TensorView(rw.get(), DType::kF32, {rows, K});
  out.num_recv_tokens_per_expert = TensorView(rcount.get(), DType::kI32, {E_local});
  buffer.ht_dispatch(args, handle, out, stream);
  buffer.synchronize(stream);
  handle.check_capacity();

  // ---- dispatch, bitwise ----
  auto got_x = rx.download(N * row_bytes);
  const auto& wx = mine_ref.x;
  const uint8_t* want_x = wx.is_fp8() ? wx.fp8.data() : reinterpret_cast<const uint8_t*>(wx.bf16.data());
  for (int64_t i = 0; i < int64_t(N * row_bytes); ++i) {
    if (got_x[i] != want_x[i]) {
      GPU_EXPECT(false, "[%s] recv_x row %lld byte %lld: expected 0x%02x, got 0x%02x (source rank %d token %d)", c.name,
                 (long long)(i / row_bytes), (long long)(i % row_bytes), want_x[i], got_x[i],
                 mine_ref.handle.recv_src_rank[i / row_bytes], mine_ref.handle.recv_src_token[i / row_bytes]);
    }
  }
  if (c.fmt != Fmt::kBf16) {
    auto got_s = rs.download(N * scale_cols);
    const int32_t* want_s = c.fmt == Fmt::kFp8 ? reinterpret_cast<const int32_t*>(wx.scales.data()) : wx.packed_scales.data();
    for (int64_t i = 0; i < N * scale_cols; ++i)
      GPU_EXPECT(got_s[i] == want_s[i], "[%s] recv_x_scales row %lld col %lld: expected 0x%08x, got 0x%08x", c.name,
                 (long long)(i / scale_cols), (long long)(i % scale_cols), want_s[i], got_s[i]);
  }
  {
    std::vector<int64_t> got_idx(N * K);
    if (c.idx_i32) {
      auto g = ridx32.download(N * K);
      std::copy(g.begin(), g.end(), got_idx.begin());
    } else {
      got_idx = ridx64.download(N * K);
    }
    auto got_w = rw.download(N * K);
    for (int64_t i = 0; i < N * K; ++i) {
      GPU_EXPECT(got_idx[i] == mine_ref.topk_idx[i], "[%s] recv_topk_idx[%lld][%lld]: expected %lld, got %lld", c.name,
                 (long long)(i / K), (long long)(i % K), (long long)mine_ref.topk_idx[i], (long long)got_idx[i]);
      GPU_EXPECT(got_w[i] == mine_ref.topk_weights[i], "[%s] recv_topk_weights[%lld][%lld]: expected %g, got %g", c.name,
                 (long long)(i / K), (long long)(i % K), mine_ref.topk_weights[i], got_w[i]);
    }
    DeviceArray<int32_t> src_tok_copy(0);
    std::vector<int32_t> got_src(N);
    if (N) cudaMemcpy(got_src.data(), handle.recv_src_token(), N * 4, cudaMemcpyDeviceToHost);
    for (int64_t i = 0; i < N; ++i)
      GPU_EXPECT(got_src[i] == mine_ref.handle.recv_src_token[i], "[%s] recv_src_token[%lld]: expected %d, got %d", c.name,
                 (long long)i, mine_ref.handle.recv_src_token[i], got_src[i]);
    auto got_count = rcount.download();
    auto host_count = handle.num_recv_tokens_per_expert();
    for (int j = 0; j < E_local; ++j) {
      GPU_EXPECT(got_count[j] == mine_ref.num_recv_tokens_per_expert[j], "[%s] num_recv_tokens_per_expert[%d]: expected %d, got %d",
                 c.name, j, mine_ref.num_recv_tokens_per_expert[j], got_count[j]);
      GPU_EXPECT(host_count[j] == mine_ref.num_recv_tokens_per_expert[j], "[%s] host per-expert count [%d]: expected %d, got %d",
                 c.name, j, mine_ref.num_recv_tokens_per_expert[j], host_count[j]);
    }
  }

  // ---- cached dispatch: new data along the same handle, no notify ----
  if (also_cached && c.fmt == Fmt::kBf16) {
    std::vector<ref::TokenRows> xs;
    std::vector<ref::HtHandle> handles;
    for (int s = 0; s < R; ++s) {
      xs.push_back(ref::bf16_rows(tokens_of(c, s), H, workload::make_bf16(size_t(tokens_of(c, s)) * H, seed + 9, s)));
      handles.push_back(want[s].handle);
    }
    auto want_cached = ref::ht_dispatch_cached(handles, xs);
    DeviceArray<uint16_t> x2(xs[me].bf16);
    HtDispatchArgs a2;
    a2.x = TensorView(x2.get(), DType::kBF16, {T, H});
    a2.num_sms = c.num_sms;
    rx.poison();
    HtDispatchOutputs o2;
    o2.recv_x = out.recv_x;
    buffer.ht_dispatch(a2, handle, o2, stream);
    buffer.synchronize(stream);
    auto g2 = rx.download(N * row_bytes);
    int64_t d = first_diff(g2, std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(want_cached[me].bf16.data()),
                                                    reinterpret_cast<const uint8_t*>(want_cached[me].bf16.data()) + N * row_bytes), N * row_bytes);
    GPU_EXPECT(d < 0, "[%s] cached dispatch recv_x row %lld differs", c.name, (long long)(d / row_bytes));
  }

  // ---- combine: random expert outputs per received row, back to the sources ----
  std::vector<ref::HtCombineInput> cins(R);
  for (int d = 0; d < R; ++d) {
    cins[d].x = workload::make_bf16(size_t(want[d].handle.num_recv()) * H, seed + 5, d);
    cins[d].topk_weights = want[d].topk_weights;
    cins[d].bias0 = all[d].bias0;
    cins[d].bias1 = all[d].bias1;
  }
  std::vector<ref::HtHandle> handles;
  for (auto& w : want) handles.push_back(w.handle);
  auto want_comb = ref::ht_combine(handles, cins, H);
  // In capacity sizing the expert outputs have the capacity's rows (only the first N are read).
  DeviceArray<uint16_t> y(size_t(rows) * H), b0(all[me].bias0), b1(all[me].bias1);
  y.poison();
  y.upload(cins[me].x);
  DeviceArray<uint16_t> comb(size_t(T) * H);
  DeviceArray<float> comb_w(size_t(T) * K);
  comb.poison(), comb_w.poison();
  HtCombineArgs ca;
  const int64_t y_rows = c.sizing == Sizing::kExact ? N : rows;
  ca.x = TensorView(y.get(), DType::kBF16, {y_rows, H});
  ca.topk_weights = TensorView(rw.get(), DType::kF32, {y_rows, K});
  if (c.with_bias) {
    ca.bias0 = TensorView(b0.get(), DType::kBF16, {T, H});
    ca.bias1 = TensorView(b1.get(), DType::kBF16, {T, H});
  }
  ca.num_sms = c.num_sms;
  HtCombineOutputs co;
  co.combined_x = TensorView(comb.get(), DType::kBF16, {T, H});
  co.combined_topk_weights = TensorView(comb_w.get(), DType::kF32, {T, K});
  buffer.ht_combine(ca, handle, co, stream);
  buffer.synchronize(stream);
  auto got_c = comb.download();
  auto got_cw = comb_w.download();
  int64_t inexact = 0;
  for (int64_t i = 0; i < int64_t(T) * H; ++i) {
    float g = ref::bf16_to_float(got_c[i]), w = ref::bf16_to_float(want_comb[me].x[i]);
    if (got_c[i] != want_comb[me].x[i]) ++inexact;
    GPU_EXPECT(std::fabs(g - w) <= 1e-2f * std::fabs(w) + 1e-3f, "[%s] combined_x[%lld][%lld]: expected %g, got %g", c.name,
               (long long)(i / H), (long long)(i % H), w, g);
  }
  for (int64_t i = 0; i < int64_t(T) * K; ++i)
    GPU_EXPECT(std::fabs(got_cw[i] - want_comb[me].topk_weights[i]) <= 1e-6f, "[%s] combined_topk_weights[%lld][%lld]: expected %g, got %g",
               c.name, (long long)(i / K), (long long)(i % K), want_comb[me].topk_weights[i], got_cw[i]);
  GPU_EXPECT(inexact == 0, "[%s] combine: %lld of %lld values within tolerance but not bitwise equal to the oracle's "
             "(same summation order expected)", c.name, (long long)inexact, (long long)T * H);
  return 0;
}

int run_cases(const RankContext& ctx, std::initializer_list<HtCase> cases, int rounds = 1) {
  Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  size_t bytes = 0;
  for (const auto& c : cases)
    bytes = std::max(bytes, Buffer::ht_size_hint(ctx.num_ranks, c.tokens + 3, c.hidden, c.topk) + (size_t(c.hidden) << 5));
  Buffer buffer(comm, bytes, 0);
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  const uint64_t seed = run_seed(ctx.id);
  if (ctx.rank == 0) std::printf("seed %llu\n", (unsigned long long)seed);
  HtHandle handle;
  int rc = 0;
  for (int r = 0; r < rounds && rc == 0; ++r)
    for (const auto& c : cases) {
      rc = run_round(ctx, c, buffer, handle, seed + 1000 * r + 77 * (&c - cases.begin()), stream, r == 0);
      if (rc) break;
      if (ctx.rank == 0 && r == 0) std::printf("ok: %s\n", c.name);
    }
  cudaStreamDestroy(stream);
  return rc;
}

GPU_CASE(ht_bf16_exact_uniform_7168, 2, 240) {
  return run_cases(ctx, {{"bf16 T=512 H=7168 top-8/256 i64", 512, 7168, 8, 256}});
}

GPU_CASE(ht_fp8_scales_capacity_skewed, 2, 240) {
  HtCase a{"fp8 T=300 H=2048 top-6/64 i32 skewed capacity", 300, 2048, 6, 64, Fmt::kFp8, true, Routing::kSkewed};
  a.sizing = Sizing::kCapacity;
  HtCase b{"fp8-ue8m0 T=257 H=7168 top-8/256", 257, 7168, 8, 256, Fmt::kFp8Ue8m0};
  return run_cases(ctx, {a, b});
}

GPU_CASE(ht_shapes_hidden_topk_experts, 2, 300) {
  return run_cases(ctx, {
      {"H=128 top-1/8", 64, 128, 1, 8},
      {"H=2880 top-2/64 i32", 96, 2880, 2, 64, Fmt::kBf16, true},
      {"H=8192 top-9/256", 80, 8192, 9, 256},
      {"fp8 H=2880 top-6/64", 70, 2944, 6, 64, Fmt::kFp8},
      {"H=2048 top-32/64 skewed", 50, 2048, 32, 64, Fmt::kBf16, false, Routing::kSkewed},
      {"fp8 H=7168 top-8/8", 40, 7168, 8, 8, Fmt::kFp8},
  });
}

GPU_CASE(ht_edge_empty_rank_single_token_all_masked_alignment, 2, 240) {
  HtCase empty{"rank 1 has no tokens", 64, 1024, 4, 64};
  empty.zero_tokens_rank = 1;
  HtCase one{"T=1 (rank 0), alignment 4", 1, 512, 3, 16};
  one.expert_alignment = 4;
  HtCase masked{"every slot -1", 32, 256, 2, 8};
  masked.masked_slots = 32 * 2;
  HtCase half{"half the slots -1, alignment 128", 200, 2048, 8, 64};
  half.masked_slots = 800;
  half.expert_alignment = 128;
  HtCase sms{"8 SMs", 700, 4096, 8, 256};
  sms.num_sms = 8;
  HtCase one_sm{"1 SM", 90, 1024, 4, 32};
  one_sm.num_sms = 1;
  return run_cases(ctx, {empty, one, masked, half, sms, one_sm});
}

GPU_CASE(ht_1000_rounds_one_buffer_mixed, 2, 500) {
  HtCase a{"small bf16", 48, 256, 4, 32};
  HtCase b{"small fp8 capacity", 40, 512, 3, 16, Fmt::kFp8};
  b.sizing = Sizing::kCapacity;
  HtCase e{"small empty rank", 16, 128, 2, 8};
  e.zero_tokens_rank = 0;
  return run_cases(ctx, {a, b, e}, 334);  // 1002 notify + dispatch + combine rounds
}

}  // namespace
}  // namespace expertlink::test

namespace expertlink::test {
namespace {

// Kernel-level timing of the HT phases on the bench shape (FIGURE lines): where the time goes.
GPU_CASE(ht_timing_breakdown, 2, 300) {
  const int R = ctx.num_ranks, T = 4096, H = 7168, K = 8, E = 256;
  Communicator comm(ctx.id, ctx.rank, R, ctx.device);
  Buffer buffer(comm, Buffer::ht_size_hint(R, T, H, K), 0);
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  const uint64_t seed = run_seed(ctx.id);
  auto idx = workload::make_topk_idx(T, K, E, R, Routing::kUniform, seed, ctx.rank);
  auto wts = workload::make_topk_weights(idx, K, seed, ctx.rank);
  DeviceArray<int64_t> idx_dev(idx);
  DeviceArray<float> w_dev(wts);
  DeviceArray<uint16_t> x(workload::make_bf16(size_t(T) * H, seed, ctx.rank));
  const int64_t cap = int64_t(R) * T;
  DeviceArray<uint16_t> rx(cap * H), y(cap * H), out(size_t(T) * H);
  DeviceArray<int64_t> ridx(cap * K);
  DeviceArray<float> rw(cap * K);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  HtHandle handle;
  for (int sms : {24, 8}) {
    HtDispatchArgs a;
    a.x = TensorView(x.get(), DType::kBF16, {T, H});
    a.topk_idx = TensorView(idx_dev.get(), DType::kI64, {T, K});
    a.topk_weights = TensorView(w_dev.get(), DType::kF32, {T, K});
    a.num_experts = E;
    a.num_sms = sms;
    HtDispatchOutputs o;
    o.recv_x = TensorView(rx.get(), DType::kBF16, {cap, H});
    o.recv_topk_idx = TensorView(ridx.get(), DType::kI64, {cap, K});
    o.recv_topk_weights = TensorView(rw.get(), DType::kF32, {cap, K});
    HtCombineArgs ca;
    ca.x = TensorView(y.get(), DType::kBF16, {cap, H});
    ca.num_sms = sms;
    HtCombineOutputs co;
    co.combined_x = TensorView(out.get(), DType::kBF16, {T, H});
    std::vector<float> t_notify, t_dispatch, t_combine;
    for (int it = 0; it < 25; ++it) {
      float ms = 0;
      buffer.barrier(stream);
      cudaEventRecord(e0, stream);
      buffer.ht_notify(a, handle, Sizing::kCapacity, cap, stream);
      cudaEventRecord(e1, stream);
      buffer.synchronize(stream);
      cudaEventElapsedTime(&ms, e0, e1);
      t_notify.push_back(ms * 1000);
      buffer.barrier(stream);
      cudaEventRecord(e0, stream);
      buffer.ht_dispatch(a, handle, o, stream);
      cudaEventRecord(e1, stream);
      buffer.synchronize(stream);
      cudaEventElapsedTime(&ms, e0, e1);
      t_dispatch.push_back(ms * 1000);
      buffer.barrier(stream);
      cudaEventRecord(e0, stream);
      buffer.ht_combine(ca, handle, co, stream);
      cudaEventRecord(e1, stream);
      buffer.synchronize(stream);
      cudaEventElapsedTime(&ms, e0, e1);
      t_combine.push_back(ms * 1000);
    }
    auto med = [](std::vector<float> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    std::printf("FIGURE ht breakdown rank %d, %d SMs, BF16 T=4096 H=7168: notify %.1f us, dispatch %.1f us, combine %.1f us\n",
                ctx.rank, sms, med(t_notify), med(t_dispatch), med(t_combine));
  }
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace
}  // namespace expertlink::test

namespace expertlink::test {
namespace {

// notify (capacity sizing) + dispatch + combine captured once in a CUDA graph, then replayed on fresh
// inputs copied into the same buffers; every replay checked against the oracle.
GPU_CASE(ht_graph_capture_replays, 2, 240) {
  const int R = ctx.num_ranks, me = ctx.rank, T = 256, H = 2048, K = 8, E = 64;
  Communicator comm(ctx.id, me, R, ctx.device);
  Buffer buffer(comm, Buffer::ht_size_hint(R, T, H, K), 0);
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  const int64_t cap = int64_t(R) * T;
  DeviceArray<uint16_t> x(size_t(T) * H), rx(cap * H), out(size_t(T) * H);
  DeviceArray<int64_t> idx(size_t(T) * K), ridx(cap * K);
  DeviceArray<float> w(size_t(T) * K), rw(cap * K);
  HtDispatchArgs a;
  a.x = TensorView(x.get(), DType::kBF16, {T, H});
  a.topk_idx = TensorView(idx.get(), DType::kI64, {T, K});
  a.topk_weights = TensorView(w.get(), DType::kF32, {T, K});
  a.num_experts = E;
  HtDispatchOutputs o;
  o.recv_x = TensorView(rx.get(), DType::kBF16, {cap, H});
  o.recv_topk_idx = TensorView(ridx.get(), DType::kI64, {cap, K});
  o.recv_topk_weights = TensorView(rw.get(), DType::kF32, {cap, K});
  HtCombineArgs ca;
  ca.x = TensorView(rx.get(), DType::kBF16, {cap, H});  // combine of dispatch: each row comes back
  HtCombineOutputs co;
  co.combined_x = TensorView(out.get(), DType::kBF16, {T, H});
  HtHandle handle;
  const uint64_t seed = run_seed(ctx.id);

  auto inputs_of = [&](uint64_t s, int r) {
    ref::HtDispatchInput in;
    in.x = ref::bf16_rows(T, H, workload::make_bf16(size_t(T) * H, s, r));
    in.topk_idx = workload::make_topk_idx(T, K, E, R, Routing::kUniform, s + 1, r, 16);
    in.topk_weights = workload::make_topk_weights(in.topk_idx, K, s + 2, r);
    return in;
  };
  auto upload = [&](const ref::HtDispatchInput& in) {
    x.upload(in.x.bf16);
    idx.upload(in.topk_idx);
    w.upload(in.topk_weights);
  };
  auto run = [&] {
    buffer.ht_notify(a, handle, Sizing::kCapacity, cap, stream);
    buffer.ht_dispatch(a, handle, o, stream);
    buffer.ht_combine(ca, handle, co, stream);
  };
  upload(inputs_of(seed, me));
  run();  // sizes the handle outside the capture
  buffer.synchronize(stream);

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  GPU_EXPECT(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess, "begin capture");
  run();
  GPU_EXPECT(cudaStreamEndCapture(stream, &graph) == cudaSuccess, "end capture");
  GPU_EXPECT(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess, "instantiate");

  for (int replay = 0; replay < 5; ++replay) {
    const uint64_t s = seed + 100 * (replay + 1);
    std::vector<ref::HtDispatchInput> ins;
    for (int r = 0; r < R; ++r) ins.push_back(inputs_of(s, r));
    ref::HtDispatchParams rp;
    rp.num_experts = E;
    rp.topk = K;
    auto want = ref::ht_dispatch(rp, ins);
    std::vector<ref::HtCombineInput> cins(R);
    std::vector<ref::HtHandle> handles;
    for (int d = 0; d < R; ++d) {
      cins[d].x = want[d].x.bf16;
      handles.push_back(want[d].handle);
    }
    auto want_comb = ref::ht_combine(handles, cins, H);
    upload(ins[me]);
    rx.poison();
    out.poison();
    cudaGraphLaunch(exec, stream);
    buffer.synchronize(stream);
    handle.check_capacity();
    const int64_t N = want[me].handle.num_recv();
    GPU_EXPECT(handle.num_recv_tokens() == N, "replay %d: %lld rows, oracle %lld", replay,
               (long long)handle.num_recv_tokens(), (long long)N);
    auto got = rx.download(N * H);
    int64_t d = first_diff(got, want[me].x.bf16, N * H);
    GPU_EXPECT(d < 0, "replay %d: recv_x row %lld col %lld: expected 0x%04x, got 0x%04x", replay, (long long)(d / H),
               (long long)(d % H), d < 0 ? 0 : want[me].x.bf16[d], d < 0 ? 0 : got[d]);
    auto got_c = out.download();
    d = first_diff(got_c, want_comb[me].x, size_t(T) * H);
    GPU_EXPECT(d < 0, "replay %d: combined_x row %lld col %lld: expected 0x%04x, got 0x%04x", replay,
               (long long)(d / H), (long long)(d % H), d < 0 ? 0 : want_comb[me].x[d], d < 0 ? 0 : got_c[d]);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace
}  // namespace expertlink::test
