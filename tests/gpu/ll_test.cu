// LL dispatch/combine on all local GPUs, checked against the CPU oracle (machinery: ll_check.hpp):
// shapes and formats, T from 0 to N, masked and repeated picks, split calls (two in flight, a third
// refused), zero-copy combine, CUDA-graph replays, 1000 rounds on one buffer interleaved with HT calls,
// argument errors, a missing rank, and the LL-shape timings (lines "FIGURE ...").
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "ll_check.hpp"

namespace expertlink::test {
namespace {

using llt::LlCase;
using llt::LlIo;
using llt::LlRound;

struct Env {
  Communicator comm;
  Buffer buffer;
  cudaStream_t stream = nullptr;
  uint64_t seed;
  Env(const RankContext& ctx, size_t ht_bytes, size_t ll_bytes, RuntimeOptions options = {})
      : comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device),
        buffer(comm, ht_bytes, ll_bytes, options),
        seed(run_seed(ctx.id)) {
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (ctx.rank == 0) std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  }
  ~Env() { cudaStreamDestroy(stream); }
};

int run_fused(const RankContext& ctx, Env& env, LlIo& io, const LlRound& r, uint64_t y_seed) {
  return llt::run_fused(ctx, env.buffer, env.stream, io, r, y_seed);
}

int run_cases(const RankContext& ctx, std::initializer_list<LlCase> cases, int rounds = 1) {
  Env env(ctx, 0, llt::ll_bytes_for(cases, ctx.num_ranks));
  for (const LlCase& c : cases) {
    LlIo io(c, ctx.num_ranks, ctx.rank);
    for (int i = 0; i < rounds; ++i) {
      const uint64_t seed = env.seed + 1000 * i + 17 * (&c - cases.begin());
      if (run_fused(ctx, env, io, llt::make_round(c, ctx.num_ranks, seed, llt::full_tokens(c, ctx.num_ranks)),
                    seed + 5) != 0)
        return 1;
    }
    if (ctx.rank == 0) std::printf("ok: %s\n", c.name);
  }
  return 0;
}

GPU_CASE(ll_fp8_ll_shape_matches_oracle, 2, 300) {
  return run_cases(ctx, {{"fp8 N=T=128 H=7168 top-8/288, 10 masked", 128, 7168, 8, 288}}, 2);
}

// One rank, as ht_single_rank_matches_oracle: rank 0 alone, every message to itself.
GPU_CASE(ll_single_rank_matches_oracle, 1, 240) {
  if (ctx.rank != 0) return 0;
  LlCase fp8{"1 rank: fp8 N=T=64 H=7168 top-8/32", 64, 7168, 8, 32};
  LlCase bf16{"1 rank: bf16 N=32 H=2880 top-4/16", 32, 2880, 4, 16, false};
  return run_cases(alone(ctx), {fp8, bf16}, 2);
}

GPU_CASE(ll_fp8_scale_formats_and_hidden_sizes, 2, 300) {
  LlCase a{"fp8 round_scale H=7168 i32 ids, row-major scales, i32 ranges",
           64,
           7168,
           8,
           288,
           true,
           true,
           false,
           true};
  a.range_i32 = true;
  a.row_major_scales = true;
  LlCase b{"fp8 ue8m0 H=7168 top-8/288", 128, 7168, 8, 288, true, true, true};
  LlCase c{"fp8 ue8m0 H=2176 (partial scale word) top-6/64", 48, 2176, 6, 64, true, true, true};
  LlCase d{"fp8 H=16384 top-16/64", 32, 16384, 16, 64};
  LlCase e{"fp8 H=128 top-1/2, skewed", 16, 128, 1, 2};
  e.routing = workload::Routing::kSkewed;
  e.masked_slots = 3;
  return run_cases(ctx, {a, b, c, d, e});
}

GPU_CASE(ll_bf16_hidden_2880_and_7168, 2, 300) {
  return run_cases(ctx, {{"bf16 H=2880 top-4/64", 64, 2880, 4, 64, false},
                         {"bf16 N=T=128 H=7168 top-8/288", 128, 7168, 8, 288, false}});
}

GPU_CASE(ll_tokens_0_to_n_masked_and_duplicates, 2, 240) {
  LlCase c{"fp8 N=64 H=1024 top-8/32, repeated experts, 100 masked", 64, 1024, 8, 32};
  c.duplicates = true;
  c.masked_slots = 100;
  LlCase all_masked{"bf16 N=16 H=512 top-4/16, every slot -1", 16, 512, 4, 16, false};
  all_masked.masked_slots = 16 * 4;
  Env env(ctx, 0, llt::ll_bytes_for({c, all_masked}, ctx.num_ranks));
  LlIo io(c, ctx.num_ranks, ctx.rank);
  const int patterns[][2] = {{0, 64}, {64, 0}, {1, 17}, {64, 64}, {33, 1}, {0, 0}, {63, 2}};
  int i = 0;
  for (const auto& pat : patterns) {
    std::vector<int> tokens(ctx.num_ranks);
    for (int s = 0; s < ctx.num_ranks; ++s) tokens[s] = pat[s % 2];
    const uint64_t seed = env.seed + 31 * ++i;
    if (run_fused(ctx, env, io, llt::make_round(c, ctx.num_ranks, seed, tokens), seed + 5) != 0) return 1;
    if (ctx.rank == 0) std::printf("ok: %s, T = (%d, %d)\n", c.name, pat[0], pat[1]);
  }
  LlIo io2(all_masked, ctx.num_ranks, ctx.rank);
  if (run_fused(ctx, env, io2,
                llt::make_round(all_masked, ctx.num_ranks, env.seed + 7,
                                llt::full_tokens(all_masked, ctx.num_ranks)),
                env.seed + 8) != 0)
    return 1;
  if (ctx.rank == 0) std::printf("ok: %s\n", all_masked.name);
  return 0;
}

GPU_CASE(ll_hook_two_in_flight_third_rejected, 2, 240) {
  const int R = ctx.num_ranks;
  LlCase c{"fp8 N=32 H=2048 top-8/64", 32, 2048, 8, 64};
  Env env(ctx, 0, llt::ll_bytes_for({c}, R));
  return llt::run_hook_rounds(ctx, env.buffer, env.stream, c, env.seed, 3);
}

GPU_CASE(ll_zero_copy_combine_buffer, 2, 120) {
  const int R = ctx.num_ranks;
  LlCase c{"bf16 N=32 H=4096 top-8/64", 32, 4096, 8, 64, false};
  Env env(ctx, 0, llt::ll_bytes_for({c}, R));
  return llt::run_zero_copy_rounds(ctx, env.buffer, env.stream, c, env.seed);
}

GPU_CASE(ll_cuda_graph_capture_replays, 2, 300) {
  const int R = ctx.num_ranks;
  LlCase c{"fp8 N=64 H=7168 top-8/288", 64, 7168, 8, 288};
  Env env(ctx, 0, llt::ll_bytes_for({c}, R));
  return llt::run_graph_capture_rounds(ctx, env.buffer, env.stream, c, env.seed);
}

// HT notify + dispatch + combine of x with no weights: every token comes back as x times the number of
// ranks it went to (sums of equal BF16 values are exact in float).
int ht_round(const RankContext& ctx, Env& env, uint64_t seed) {
  const int R = ctx.num_ranks, T = 40, H = 512, K = 4, E = 16;
  auto x = workload::make_bf16(size_t(T) * H, seed, ctx.rank);
  auto idx = workload::make_topk_idx(T, K, E, R, workload::Routing::kUniform, seed + 1, ctx.rank, 5);
  DeviceArray<uint16_t> xd(x), recv(size_t(T) * R * H), comb(size_t(T) * H);
  DeviceArray<int64_t> idxd(idx);
  HtDispatchArgs a;
  a.x = TensorView(xd.get(), DType::kBF16, {T, H});
  a.topk_idx = TensorView(idxd.get(), DType::kI64, {T, K});
  a.num_experts = E;
  HtHandle h;
  env.buffer.ht_notify(a, h, Sizing::kExact, 0, env.stream);
  const int64_t n = h.num_recv_tokens();
  HtDispatchOutputs o;
  o.recv_x = TensorView(recv.get(), DType::kBF16, {std::max<int64_t>(n, 1), H});
  env.buffer.ht_dispatch(a, h, o, env.stream);
  HtCombineArgs ca;
  ca.x = TensorView(recv.get(), DType::kBF16, {n, H});
  HtCombineOutputs co;
  co.combined_x = TensorView(comb.get(), DType::kBF16, {T, H});
  env.buffer.ht_combine(ca, h, co, env.stream);
  env.buffer.synchronize(env.stream);
  auto got = comb.download();
  for (int t = 0; t < T; ++t) {
    uint64_t ranks = 0;
    for (int k = 0; k < K; ++k)
      if (idx[t * K + k] >= 0) ranks |= 1ull << (idx[t * K + k] / (E / R));
    const float m = static_cast<float>(__builtin_popcountll(ranks));
    for (int c = 0; c < H; ++c) {
      const uint16_t want = reference::float_to_bf16(m * reference::bf16_to_float(x[t * H + c]));
      GPU_EXPECT(got[t * H + c] == want,
                 "HT round between LL calls: combined[%d][%d] = 0x%04x, expected 0x%04x", t, c,
                 got[t * H + c], want);
    }
  }
  return 0;
}

GPU_CASE(ll_1000_rounds_one_buffer_mixed_with_ht, 2, 600) {
  const int R = ctx.num_ranks;
  LlCase a{"fp8 round_scale N=16 H=512 top-4/16", 16, 512, 4, 16, true, true};
  a.masked_slots = 6;
  LlCase b{"bf16 N=8 H=256 top-3/8 i32 ids", 8, 256, 3, 8, false};
  b.idx_i32 = true;
  b.masked_slots = 2;
  Env env(ctx, Buffer::ht_size_hint(R, 40, 512, 4), llt::ll_bytes_for({a, b}, R));
  Buffer& buf = env.buffer;
  cudaStream_t st = env.stream;
  LlIo a1(a, R, ctx.rank), a2(a, R, ctx.rank), b1(b, R, ctx.rank);
  const int calls = llt::run_mixed_rounds(ctx, buf, st, a1, a2, b1, env.seed, 1000,
                                          [&](uint64_t seed) { return ht_round(ctx, env, seed); });
  if (calls < 0) return 1;
  if (ctx.rank == 0)
    std::printf("ok: %d LL dispatch+combine pairs (fused, split, two in flight) and HT rounds\n", calls);
  return 0;
}

GPU_CASE(ll_rejects_bad_arguments_naming_them, 2, 120) {
  const int R = ctx.num_ranks;
  LlCase c{"fp8 N=8 H=256 top-2/8", 8, 256, 2, 8};
  Env env(ctx, 0, llt::ll_bytes_for({c}, R));
  Buffer& buf = env.buffer;
  cudaStream_t st = env.stream;
  LlIo io(c, R, ctx.rank);
  LlRound r = llt::make_round(c, R, env.seed, llt::full_tokens(c, R));
  io.load(r, st);
  auto dispatch = [&](LlDispatchArgs a, LlDispatchOutputs o) { buf.ll_dispatch(a, io.handle, o, st); };
  LlDispatchArgs a = io.dispatch_args(false);
  LlDispatchOutputs o = io.dispatch_outputs();
  // The refusals the path across nodes shares, then this path's own.
  int rc = llt::expect_common_refusals(ctx, buf, st, io, a, o);
  {
    LlDispatchArgs bad = a;
    bad.num_experts = 7;
    rc |= expect_invalid(
        ctx, [&] { dispatch(bad, o); }, "num_experts = 7", "experts not divisible by ranks");
  }
  {
    LlDispatchArgs bad = a;
    bad.num_max_dispatch_tokens_per_rank = 2000;
    rc |= expect_invalid(
        ctx, [&] { dispatch(bad, o); }, "num_max_dispatch_tokens_per_rank = 2000", "N too large");
  }
  {
    // BF16 rows of 100 channels are 200 bytes: not a multiple of 16 (the kernels move 16-byte vectors).
    LlDispatchArgs bad = a;
    bad.options.use_fp8 = false;
    bad.x = TensorView(io.x.get(), DType::kBF16, {8, 100});
    rc |= expect_invalid(
        ctx, [&] { dispatch(bad, o); }, "x rows", "bf16 hidden 100: rows not 16-byte multiples");
  }
  {
    // 200 channels are 400 bytes (16-byte rows) but no whole number of 128-channel FP8 scale groups.
    LlDispatchArgs bad = a;
    bad.x = TensorView(io.x.get(), DType::kBF16, {8, 200});
    rc |= expect_invalid(
        ctx, [&] { dispatch(bad, o); }, "hidden = 200 must be a multiple of 128",
        "fp8 hidden 200: not a multiple of 128");
  }
  {
    LlDispatchOutputs bad = o;
    bad.recv_scales = TensorView();
    rc |= expect_invalid(
        ctx, [&] { dispatch(a, bad); }, "recv_scales must be", "fp8 without recv_scales");
  }
  {
    LlDispatchOutputs bad = o;
    bad.layout_range = TensorView(io.range32.get(), DType::kI32, {c.experts / R, R});
    rc |= expect_invalid(
        ctx, [&] { dispatch(a, bad); }, "layout_range", "layout_range of the wrong shape");
  }
  if (rc != 0) return 1;
  // A buffer too small for the shape, an expert id out of range reported by the next call.
  if (llt::expect_late_refusals(ctx, env.comm, buf, st, io, r, a, o) != 0) return 1;
  // The buffer still works.
  return run_fused(ctx, env, io, r, env.seed + 1);
}

// The last rank never calls: every other rank must fail with a timeout naming it and the LL wait.
GPU_CASE(ll_missing_rank_times_out_naming_it, 2, 60) {
  const int R = ctx.num_ranks;
  LlCase c{"bf16 N=8 H=256 top-2/8", 8, 256, 2, 8, false};
  RuntimeOptions options;
  options.timeout_s = 1.0;
  Env env(ctx, 0, llt::ll_bytes_for({c}, R), options);
  LlIo io(c, R, ctx.rank);
  if (run_fused(ctx, env, io, llt::make_round(c, R, env.seed, llt::full_tokens(c, R)), env.seed + 1) != 0)
    return 1;
  const int absent = R - 1;
  if (ctx.rank == absent) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3000));
    return 0;
  }
  auto t0 = std::chrono::steady_clock::now();
  std::string message;
  ErrorCode code = ErrorCode::kInternal;
  try {
    env.buffer.ll_dispatch(io.dispatch_args(false), io.handle, io.dispatch_outputs(), env.stream);
    env.buffer.synchronize(env.stream);
  } catch (const Error& e) {
    message = e.what();
    code = e.code();
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("FIGURE ll: rank %d detected the silent rank after %.3f s (timeout 1 s): %s\n", ctx.rank, s,
              message.c_str());
  GPU_EXPECT(code == ErrorCode::kTimeout, "a timeout error, got '%s'", message.c_str());
  GPU_EXPECT(message.find("waiting for rank " + std::to_string(absent)) != std::string::npos,
             "the message to name rank %d: '%s'", absent, message.c_str());
  GPU_EXPECT(message.find("LL dispatch") != std::string::npos, "the message to name the LL dispatch: '%s'",
             message.c_str());
  GPU_EXPECT(s >= 0.9 && s < 2.5, "detection within the 1 s timeout (+ slack), took %.3f s", s);
  return 0;
}

__global__ void ll_empty_kernel() {}

// LL-shape latencies, CUDA events around each call, L2 flushed (256 MB write) and ranks aligned (window
// barrier) before each timed run; median of 50 after 10 warm-ups, printed by every rank. The first line
// is the floor of any LL kernel: an empty cooperative launch of the same grid, timed the same way.
GPU_CASE(ll_timing_ll_shape, 2, 300) {
  const int R = ctx.num_ranks;
  LlCase fp8{"fp8", 128, 7168, 8, 288};
  LlCase bf16{"bf16", 128, 7168, 8, 288, false};
  Env env(ctx, 0, llt::ll_bytes_for({fp8}, R));
  Buffer& buf = env.buffer;
  cudaStream_t st = env.stream;
  LlIo io(fp8, R, ctx.rank), iob(bf16, R, ctx.rank);
  LlRound r = llt::make_round(fp8, R, env.seed, llt::full_tokens(fp8, R));
  LlRound rb = llt::make_round(bf16, R, env.seed, llt::full_tokens(bf16, R));
  if (run_fused(ctx, env, io, r, env.seed + 1) != 0 || run_fused(ctx, env, iob, rb, env.seed + 1) != 0)
    return 1;
  DeviceArray<uint8_t> flush(256u << 20);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, ctx.device);
  constexpr int kWarm = 10, kRuns = 50;
  std::vector<cudaEvent_t> ev(4 * (kWarm + kRuns));
  for (auto& e : ev) cudaEventCreate(&e);
  // `first` and `second` are the timed parts; `between` runs untimed between them (ranks re-aligned).
  auto time = [&](const char* name, const std::function<void()>& first, const std::function<void()>& between,
                  const std::function<void()>& second) {
    for (int i = 0; i < kWarm + kRuns; ++i) {
      cudaMemsetAsync(flush.get(), i, flush.size(), st);
      buf.barrier(st);
      cudaEventRecord(ev[4 * i], st);
      first();
      cudaEventRecord(ev[4 * i + 1], st);
      if (second) {
        between();
        cudaEventRecord(ev[4 * i + 2], st);
        second();
        cudaEventRecord(ev[4 * i + 3], st);
      }
    }
    buf.synchronize(st);
    for (int part = 0; part < (second ? 2 : 1); ++part) {
      std::vector<float> us;
      for (int i = kWarm; i < kWarm + kRuns; ++i) {
        float ms = 0;
        cudaEventElapsedTime(&ms, ev[4 * i + 2 * part], ev[4 * i + 2 * part + 1]);
        us.push_back(ms * 1000);
      }
      std::sort(us.begin(), us.end());
      std::printf(
          "FIGURE %s%s rank %d: %.1f us median of %d [min %.1f, max %.1f] (T=128 H=7168 top-8/288, %d ranks, "
          "%s, "
          "%d SMs, LL buffer %.1f MB)\n",
          name, second ? (part == 0 ? " send half" : " receive half") : "", ctx.rank, us[kRuns / 2], kRuns,
          us[0], us[kRuns - 1], R, prop.name, buf.ll_sms(), buf.ll_bytes() / 1e6);
    }
  };
  auto dispatch = [&](LlIo& x, bool hook) {
    return buf.ll_dispatch(x.dispatch_args(hook), x.handle, x.dispatch_outputs(), st);
  };
  auto combine = [&](LlIo& x, bool hook) {
    return buf.ll_combine(x.combine_args(hook), x.handle, x.combine_outputs(), st);
  };
  LlRecvHook pending;
  time("ll_empty_cooperative_kernel",
       [&] {
         cudaLaunchAttribute attr{};
         attr.id = cudaLaunchAttributeCooperative;
         attr.val.cooperative = 1;
         cudaLaunchConfig_t cfg{};
         cfg.gridDim = dim3(buf.ll_sms());
         cfg.blockDim = dim3(512);
         cfg.stream = st;
         cfg.attrs = &attr;
         cfg.numAttrs = 1;
         cudaLaunchKernelEx(&cfg, ll_empty_kernel);
       },
       {}, {});
  // The same grid launched the ordinary way: what the cooperative launch adds to every LL kernel.
  time("ll_empty_kernel", [&] { ll_empty_kernel<<<buf.ll_sms(), 512, 0, st>>>(); }, {}, {});
  time("ll_dispatch_fp8", [&] { dispatch(io, false); }, {}, {});
  time("ll_dispatch_bf16", [&] { dispatch(iob, false); }, {}, {});
  time("ll_combine_bf16", [&] { combine(io, false); }, {}, {});
  time("ll_roundtrip",
       [&] {
         dispatch(io, false);
         combine(io, false);
       },
       {}, {});
  time(
      "ll_dispatch_fp8 hook", [&] { pending = dispatch(io, true); }, [&] { buf.barrier(st); },
      [&] { pending(st); });
  time(
      "ll_combine_bf16 hook", [&] { pending = combine(io, true); }, [&] { buf.barrier(st); },
      [&] { pending(st); });
  for (auto& e : ev) cudaEventDestroy(e);
  if (ctx.rank == 0)
    std::printf("FIGURE ll_size_hint (R=%d, N=128, H=7168, E=288): %.1f MB symmetric per GPU\n", R,
                Buffer::ll_size_hint(R, 128, 7168, 288) / 1e6);
  // The timed calls produced correct results.
  return run_fused(ctx, env, io, r, env.seed + 1);
}

}  // namespace
}  // namespace expertlink::test
