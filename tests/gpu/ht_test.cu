// HT dispatch/combine on all local GPUs, checked against the CPU oracle (machinery: ht_check.hpp): dispatch
// bitwise (it is a copy), combine within a float tolerance (the kernels sum in the oracle's order, so it is
// exact in practice). Every rank builds every rank's inputs from the run seed, so each can run the oracle
// for the whole group.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "ht_check.hpp"

namespace expertlink::test {
namespace {

namespace ref = expertlink::reference;
using htt::first_diff;
using htt::Fmt;
using htt::HtCase;
using htt::run_round;
using workload::Routing;

int run_cases(const RankContext& ctx, std::initializer_list<HtCase> cases, int rounds = 1) {
  Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  size_t bytes = 0, recv_bytes = 0;
  for (const auto& c : cases) {
    bytes = std::max(
        bytes, Buffer::ht_size_hint(ctx.num_ranks, c.tokens + 3, c.hidden, c.topk) + (size_t(c.hidden) << 5));
    // Capacity sizing asks for 17 rows more than arrive (ht_check.cu).
    if (c.direct || c.direct_combine)
      recv_bytes = std::max(recv_bytes, Buffer::ht_recv_size_hint(ctx.num_ranks, c.tokens + 3, c.hidden) +
                                            (size_t(c.hidden) << 6));
  }
  Buffer buffer(comm, bytes, 0, {}, recv_bytes);
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

// One rank ("1 rank must also work"): rank 0 alone, with a communicator of its own, however many GPUs
// there are (the other ranks return at once). Both sizing modes, both dtypes, empty slots, few SMs, direct
// dispatch and combine; every row to and from itself.
GPU_CASE(ht_single_rank_matches_oracle, 1, 240) {
  if (ctx.rank != 0) return 0;
  HtCase a{"1 rank: bf16 T=256 H=7168 top-8/64", 256, 7168, 8, 64};
  HtCase b{"1 rank: fp8 T=100 H=2048 top-4/16 i32 capacity", 100, 2048, 4, 16, Fmt::kFp8, true};
  b.sizing = Sizing::kCapacity;
  HtCase c{"1 rank: direct, direct combine, half the slots -1", 128, 1024, 6, 32};
  c.direct = c.direct_combine = true;
  c.masked_slots = 128 * 3;
  HtCase d{"1 rank: 8 SMs, T=1, alignment 4", 1, 512, 3, 16};
  d.num_sms = 8;
  d.expert_alignment = 4;
  return run_cases(alone(ctx), {a, b, c, d}, 2);
}

GPU_CASE(ht_fp8_scales_capacity_skewed, 2, 240) {
  HtCase a{
      "fp8 T=300 H=2048 top-6/64 i32 skewed capacity", 300, 2048, 6, 64, Fmt::kFp8, true, Routing::kSkewed};
  a.sizing = Sizing::kCapacity;
  HtCase b{"fp8-ue8m0 T=257 H=7168 top-8/256", 257, 7168, 8, 256, Fmt::kFp8Ue8m0};
  return run_cases(ctx, {a, b});
}

GPU_CASE(ht_shapes_hidden_topk_experts, 2, 300) {
  return run_cases(ctx,
                   {
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

// Combine's reduce at its edges: bitwise against the oracle with biases and without, a hidden size whose
// last 2 KB of a row is partial, -1 slots, an empty rank, 1 SM, three rounds each.
GPU_CASE(ht_combine_reduce_edges_match_oracle, 2, 240) {
  HtCase big{"bf16 T=512 H=7168 top-8/256", 512, 7168, 8, 256};
  HtCase partial{
      "H=2880 (last piece partial) top-9/64 skewed", 300, 2880, 9, 64, Fmt::kBf16, true, Routing::kSkewed};
  HtCase small{"H=136 no bias", 77, 136, 2, 8};
  small.with_bias = false;
  HtCase empty{"rank 1 has no tokens", 64, 1024, 4, 64};
  empty.zero_tokens_rank = 1;
  HtCase masked{"every slot -1", 32, 256, 2, 8};
  masked.masked_slots = 32 * 2;
  HtCase one_sm{"1 SM", 90, 1024, 4, 32};
  one_sm.num_sms = 1;
  return run_cases(ctx, {big, partial, small, empty, masked, one_sm}, 3);
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

// Holds the stream for `ns` nanoseconds (GPU clock), so that work enqueued behind it starts without a
// host launch gap.
__global__ void sleep_kernel(uint64_t ns) {
  uint64_t t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  while (t - t0 < ns);
}

void gpu_sleep(cudaStream_t stream, uint64_t ns) {
  sleep_kernel<<<1, 1, 0, stream>>>(ns);
}

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
  // The notify kernel's phases on stderr ("notify trace"), read before each following notify.
  setenv("EXPERTLINK_HT_NOTIFY_TRACE", "1", 1);
  for (int variant = 0; variant < 3; ++variant) {
    // Senders: warp copies, the default, at 24 and 8 SMs; then bulk (TMA) copies at 24 (A/B).
    const int sms = variant == 1 ? 8 : 24;
    const char* copy = variant == 2 ? "bulk" : "warp";
    setenv("EXPERTLINK_HT_COPY", copy, 1);
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
    std::vector<float> gpu[3], host[3];  // notify, dispatch, combine
    auto phase = [&](int i, auto&& call) {
      buffer.barrier(stream);
      // The stream is kept busy for 100 us so that the host has enqueued the call before the GPU reaches
      // e0: e0..e1 is then GPU time alone, and the host cost of the call is measured apart.
      gpu_sleep(stream, 100000);
      cudaEventRecord(e0, stream);
      const auto h0 = std::chrono::steady_clock::now();
      call();
      host[i].push_back(
          std::chrono::duration<float, std::micro>(std::chrono::steady_clock::now() - h0).count());
      cudaEventRecord(e1, stream);
      buffer.synchronize(stream);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      gpu[i].push_back(ms * 1000);
    };
    for (int it = 0; it < 25; ++it) {
      phase(0, [&] { buffer.ht_notify(a, handle, Sizing::kCapacity, cap, stream); });
      phase(1, [&] { buffer.ht_dispatch(a, handle, o, stream); });
      phase(2, [&] { buffer.ht_combine(ca, handle, co, stream); });
    }
    auto med = [](std::vector<float> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    std::printf(
        "FIGURE ht breakdown rank %d, %d SMs, %s-copy sender, BF16 T=4096 H=7168, GPU time: notify %.1f "
        "us, dispatch %.1f us, combine %.1f us; host time of the calls: %.1f / %.1f / %.1f us\n",
        ctx.rank, sms, copy, med(gpu[0]), med(gpu[1]), med(gpu[2]), med(host[0]), med(host[1]), med(host[2]));
  }
  unsetenv("EXPERTLINK_HT_COPY");
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace
}  // namespace expertlink::test

namespace expertlink::test {
namespace {

// Direct dispatch (recv_x is the Buffer's receive region, Buffer::ht_window_recv_x): the senders write
// rows straight into their final place; direct combine (x is that region: the sources read the rows from
// the holders). The same checks as every HT case, over two rounds on one Buffer, BF16 and FP8, exact and
// capacity sizing, cached dispatch, an empty rank, 8 SMs, and calls that are not direct in between.
GPU_CASE(ht_direct_recv_x_matches_oracle, 2, 300) {
  HtCase a{"direct bf16 T=512 H=7168 top-8/256 i64, direct combine", 512, 7168, 8, 256};
  a.direct = a.direct_combine = true;
  HtCase b{"direct fp8 T=300 H=2048 top-6/64 i32 skewed capacity, direct combine",
           300,
           2048,
           6,
           64,
           Fmt::kFp8,
           true,
           Routing::kSkewed};
  b.direct = b.direct_combine = true;
  b.sizing = Sizing::kCapacity;
  // Up to 16 SMs the senders run free and the direct combine has its own instance: c and e.
  HtCase c{"direct fp8-ue8m0 T=257 H=7168 top-8/256 8 SMs, direct combine, weights in the window",
           257,
           7168,
           8,
           256,
           Fmt::kFp8Ue8m0};
  c.direct = c.direct_combine = true;
  c.num_sms = 8;
  c.window_weights = true;  // and the weights in place (ht_window_recv_topk_weights)
  HtCase d{"not direct, same Buffer", 200, 2048, 4, 64};
  HtCase e{"direct, rank 1 has no tokens, direct combine without weights, 1 SM", 64, 1024, 4, 64};
  e.direct = e.direct_combine = true;
  e.combine_weights = false;
  e.zero_tokens_rank = 1;
  e.num_sms = 1;
  return run_cases(ctx, {a, b, c, d, e}, 2);
}

// What direct dispatch refuses, before any kernel: a recv_x inside the window that is not the receive
// region's view, a Buffer without a receive region, top-k weights in the window anywhere but at
// ht_window_recv_topk_weights or for a combine that sends rows; and ranks that disagree (one direct, one not)
// fail on the device, naming the disagreement, instead of writing rows where the other does not look.
GPU_CASE(ht_direct_refusals_and_disagreement, 2, 240) {
  Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  const HtCase c{"bf16 T=128 H=2048 top-4/64", 128, 2048, 4, 64};
  const size_t bytes =
      Buffer::ht_size_hint(ctx.num_ranks, c.tokens + 3, c.hidden, c.topk) + (size_t(c.hidden) << 5);
  {
    Buffer plain(comm, bytes, 0);
    if (expect_invalid(
            ctx, [&] { plain.ht_window_recv_x(DType::kBF16, c.hidden); }, "no receive region",
            "no receive region") != 0)
      return 1;
  }
  Buffer buffer(comm, bytes, 0, {}, Buffer::ht_recv_size_hint(ctx.num_ranks, c.tokens + 3, c.hidden));
  const TensorView view = buffer.ht_window_recv_x(DType::kBF16, c.hidden);
  GPU_EXPECT(view.shape[1] == c.hidden && view.shape[0] >= ctx.num_ranks * (c.tokens + 3),
             "ht_window_recv_x: %s", view.describe().c_str());
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  const uint64_t seed = run_seed(ctx.id);
  HtHandle handle;
  // A recv_x one row into the region: refused on the host (every rank refuses, so none launches).
  {
    DeviceArray<uint16_t> x(size_t(c.tokens) * c.hidden);
    x.upload(workload::make_bf16(size_t(c.tokens) * c.hidden, seed, ctx.rank));
    auto idx = workload::make_topk_idx(c.tokens, c.topk, c.experts, ctx.num_ranks, Routing::kUniform,
                                       seed + 1, ctx.rank, 0);
    DeviceArray<int64_t> idx_dev(idx);
    HtDispatchArgs a;
    a.x = TensorView(x.get(), DType::kBF16, {c.tokens, c.hidden});
    a.topk_idx = TensorView(idx_dev.get(), DType::kI64, {c.tokens, c.topk});
    a.num_experts = c.experts;
    buffer.ht_notify(a, handle, Sizing::kCapacity, ctx.num_ranks * c.tokens, stream);
    HtDispatchOutputs o;
    o.recv_x = TensorView(static_cast<uint16_t*>(view.data) + c.hidden, DType::kBF16,
                          {ctx.num_ranks * c.tokens, c.hidden});
    if (expect_invalid(
            ctx, [&] { buffer.ht_dispatch(a, handle, o, stream); },
            "is not the view ht_window_recv_x returned", "recv_x inside the window") != 0)
      return 1;
    // The notify ran: a plain dispatch completes the round on every rank.
    DeviceArray<uint16_t> rx(size_t(ctx.num_ranks) * c.tokens * c.hidden);
    o.recv_x = TensorView(rx.get(), DType::kBF16, {ctx.num_ranks * c.tokens, c.hidden});
    buffer.ht_dispatch(a, handle, o, stream);
    buffer.synchronize(stream);
    // Top-k weights in the window: only where ht_window_recv_topk_weights starts, and only for a direct
    // combine (a combine that sends rows writes them over that view). Refused on the host, on every rank.
    const int64_t rows = int64_t(ctx.num_ranks) * c.tokens;
    const TensorView wv = buffer.ht_window_recv_topk_weights(c.topk);
    GPU_EXPECT(wv.dtype == DType::kF32 && wv.shape[1] == c.topk && wv.shape[0] >= rows,
               "ht_window_recv_topk_weights: %s", wv.describe().c_str());
    DeviceArray<uint16_t> y(size_t(rows) * c.hidden), comb(size_t(c.tokens) * c.hidden);
    HtCombineArgs ca;
    ca.x = TensorView(y.get(), DType::kBF16, {rows, c.hidden});
    ca.topk_weights = TensorView(wv.data, DType::kF32, {rows, c.topk});
    HtCombineOutputs co;
    co.combined_x = TensorView(comb.get(), DType::kBF16, {c.tokens, c.hidden});
    if (expect_invalid(
            ctx, [&] { buffer.ht_combine(ca, handle, co, stream); }, "only a direct combine",
            "a combine that sends rows, its topk_weights in the window") != 0)
      return 1;
    ca.topk_weights = TensorView(static_cast<float*>(wv.data) + c.topk, DType::kF32, {rows, c.topk});
    if (expect_invalid(
            ctx, [&] { buffer.ht_combine(ca, handle, co, stream); },
            "is not the view ht_window_recv_topk_weights returned",
            "topk_weights one row into that view") != 0)
      return 1;
  }
  // Rank 0 direct, rank 1 not: both ranks' kernels see the other's placement and stop (the Buffer stays
  // broken after that, so the combine's disagreement gets a Buffer of its own).
  HtCase mixed = c;
  mixed.direct = ctx.rank == 0;
  if (expect_invalid(
          ctx, [&] { htt::run_round(ctx, mixed, buffer, handle, seed + 5, stream, false); },
          "recv_x placement", "one rank direct, one not") != 0)
    return 1;
  {
    Buffer other(comm, bytes, 0, {}, Buffer::ht_recv_size_hint(ctx.num_ranks, c.tokens + 3, c.hidden));
    HtHandle h2;
    HtCase mixed_combine = c;
    mixed_combine.direct_combine = ctx.rank == 0;
    if (expect_invalid(
            ctx, [&] { htt::run_round(ctx, mixed_combine, other, h2, seed + 6, stream, false); },
            "combine x placement", "one rank's combine direct, one not") != 0)
      return 1;
  }
  cudaStreamDestroy(stream);
  return 0;
}

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
  GPU_EXPECT(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess,
             "begin capture");
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
    GPU_EXPECT(d < 0, "replay %d: recv_x row %lld col %lld: expected 0x%04x, got 0x%04x", replay,
               (long long)(d / H), (long long)(d % H), d < 0 ? 0 : want[me].x.bf16[d], d < 0 ? 0 : got[d]);
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
