// The StreamOrder calls (buffer.hpp, issue 3: DeepEP's stream semantics in C++): HT and LL rounds on the
// Buffer's comm stream, ordered after a previous event or the compute stream, finished by an async Event
// or by the compute stream waiting; results bitwise against the CPU oracle (LL: ll_check.hpp's checks).
// Every input the call must wait for is produced on the compute stream behind a ~10 ms hold, and every
// output is read through the stream the semantics promise, so a missing wait shows as poison, not as a
// lucky race. Then the argument errors that need a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "ht_check.hpp"
#include "ll_check.hpp"

namespace expertlink::test {
namespace {

namespace ref = expertlink::reference;
using htt::first_diff;
using llt::LlCase;
using llt::LlIo;
using llt::LlRound;

// ~10 ms at the H100/H200 clocks: long past the time the host takes to enqueue the call after it.
constexpr long long kHoldCycles = 20'000'000;

__global__ void hold_kernel(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

// `bytes` of `src` into `dst` on `stream`, behind a hold: the data is there only for work ordered after it.
void produce(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  hold_kernel<<<1, 1, 0, stream>>>(kHoldCycles);
  cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream);
}

template <typename T>
void copy_on(DeviceArray<T>& dst, const DeviceArray<T>& src, cudaStream_t stream) {
  cudaMemcpyAsync(dst.get(), src.get(), src.size() * sizeof(T), cudaMemcpyDeviceToDevice, stream);
}

// Owns a timing-free event for the compute stream's "inputs ready" marks.
struct ReadyEvent {
  cudaEvent_t event = nullptr;
  ReadyEvent() { cudaEventCreateWithFlags(&event, cudaEventDisableTiming); }
  ~ReadyEvent() { cudaEventDestroy(event); }
  ReadyEvent(const ReadyEvent&) = delete;
  ReadyEvent& operator=(const ReadyEvent&) = delete;
};

struct Env {
  Communicator comm;
  Buffer buffer;
  cudaStream_t stream = nullptr;  // the compute stream
  uint64_t seed;
  Env(const RankContext& ctx, size_t ht_bytes, size_t ll_bytes)
      : comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device),
        buffer(comm, ht_bytes, ll_bytes),
        seed(run_seed(ctx.id)) {
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (ctx.rank == 0) std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  }
  ~Env() { cudaStreamDestroy(stream); }
};

const htt::HtCase kHt{"bf16 T=300 H=2048 top-8/64", 300, 2048, 8, 64};

size_t ht_bytes(const RankContext& ctx) {
  return Buffer::ht_size_hint(ctx.num_ranks, kHt.tokens + 3, kHt.hidden, kHt.topk) +
         (size_t(kHt.hidden) << 5);
}

// Notify + dispatch + combine of kHt, all on the comm stream, in DeepEP's chain: x and the expert outputs
// are produced on the compute stream and handed over by previous_event; the dispatch follows the notify's
// Event (async_finish) or, without one, the compute stream (which the notify joined). Outputs are read
// after Event::wait + copies on the compute stream (dispatch) and Event::synchronize (combine), or, without
// async_finish, through copies queued on the compute stream right after each call.
int ht_round(const RankContext& ctx, Env& env, uint64_t seed, bool async_finish) {
  const int R = ctx.num_ranks, me = ctx.rank, H = kHt.hidden, K = kHt.topk, E = kHt.experts;
  std::vector<ref::HtDispatchInput> ins(R);
  for (int s = 0; s < R; ++s) {
    const int Ts = htt::tokens_of(kHt, s);
    ins[s].x = ref::bf16_rows(Ts, H, workload::make_bf16(size_t(Ts) * H, seed, s));
    ins[s].topk_idx = workload::make_topk_idx(Ts, K, E, R, workload::Routing::kUniform, seed + 1, s, 40);
    ins[s].topk_weights = workload::make_topk_weights(ins[s].topk_idx, K, seed + 2, s);
  }
  ref::HtDispatchParams rp;
  rp.num_experts = E;
  rp.topk = K;
  const auto want = ref::ht_dispatch(rp, ins);
  std::vector<ref::HtCombineInput> cins(R);
  std::vector<ref::HtHandle> handles;
  for (int d = 0; d < R; ++d) {
    cins[d].x = workload::make_bf16(size_t(want[d].handle.num_recv()) * H, seed + 5, d);
    cins[d].topk_weights = want[d].topk_weights;
    handles.push_back(want[d].handle);
  }
  const auto want_comb = ref::ht_combine(handles, cins, H);
  const int T = htt::tokens_of(kHt, me);
  const int64_t N = want[me].handle.num_recv();
  const char* mode = async_finish ? "async_finish" : "joined";
  cudaStream_t st = env.stream;
  Buffer& buf = env.buffer;
  ReadyEvent ready;

  DeviceArray<uint16_t> x_stage(ins[me].x.bf16), x(size_t(T) * H);
  DeviceArray<int64_t> idx(ins[me].topk_idx);
  DeviceArray<float> w(ins[me].topk_weights);
  x.poison();
  HtDispatchArgs a;
  a.x = TensorView(x.get(), DType::kBF16, {T, H});
  a.topk_idx = TensorView(idx.get(), DType::kI64, {T, K});
  a.topk_weights = TensorView(w.get(), DType::kF32, {T, K});
  a.num_experts = E;
  produce(x.get(), x_stage.get(), x.size() * 2, st);
  cudaEventRecord(ready.event, st);

  HtHandle h;
  Event notified = buf.ht_notify(a, h, Sizing::kExact, 0, StreamOrder{st, ready.event, true, async_finish});
  GPU_EXPECT(notified.valid() == async_finish, "[%s] ht_notify's Event valid() = %d", mode, notified.valid());
  GPU_EXPECT(h.num_recv_tokens() == N, "[%s] num_recv %lld, oracle %lld", mode,
             (long long)h.num_recv_tokens(), (long long)N);

  const int64_t rows = std::max<int64_t>(N, 1);
  DeviceArray<uint16_t> rx(rows * H), rx_seen(rows * H);
  DeviceArray<int64_t> ridx(rows * K), ridx_seen(rows * K);
  DeviceArray<float> rw(rows * K), rw_seen(rows * K);
  for (auto* p : {&rx, &rx_seen}) p->poison();
  for (auto* p : {&ridx, &ridx_seen}) p->poison();
  for (auto* p : {&rw, &rw_seen}) p->poison();
  HtDispatchOutputs o;
  o.recv_x = TensorView(rx.get(), DType::kBF16, {rows, H});
  o.recv_topk_idx = TensorView(ridx.get(), DType::kI64, {rows, K});
  o.recv_topk_weights = TensorView(rw.get(), DType::kF32, {rows, K});
  Event dispatched = buf.ht_dispatch(a, h, o, StreamOrder{st, notified.get(), true, async_finish});
  if (async_finish) dispatched.wait(st);
  copy_on(rx_seen, rx, st);
  copy_on(ridx_seen, ridx, st);
  copy_on(rw_seen, rw, st);
  buf.synchronize(st);
  {
    const int64_t d = first_diff(rx_seen.download(N * H), want[me].x.bf16, N * H);
    GPU_EXPECT(d < 0, "[%s] recv_x[%lld][%lld] as the compute stream sees it differs from the oracle's", mode,
               (long long)(d / H), (long long)(d % H));
    const auto got_idx = ridx_seen.download(N * K);
    const auto got_w = rw_seen.download(N * K);
    for (int64_t i = 0; i < N * K; ++i) {
      GPU_EXPECT(got_idx[i] == want[me].topk_idx[i],
                 "[%s] recv_topk_idx[%lld][%lld]: expected %lld, got %lld", mode, (long long)(i / K),
                 (long long)(i % K), (long long)want[me].topk_idx[i], (long long)got_idx[i]);
      GPU_EXPECT(got_w[i] == want[me].topk_weights[i],
                 "[%s] recv_topk_weights[%lld][%lld]: expected %g, got %g", mode, (long long)(i / K),
                 (long long)(i % K), want[me].topk_weights[i], got_w[i]);
    }
  }

  DeviceArray<uint16_t> y_stage(cins[me].x), y(rows * H), comb(size_t(T) * H), comb_seen(size_t(T) * H);
  DeviceArray<float> comb_w(size_t(T) * K), comb_w_seen(size_t(T) * K);
  for (auto* p : {&y, &comb, &comb_seen}) p->poison();
  comb_w.poison(), comb_w_seen.poison();
  produce(y.get(), y_stage.get(), y_stage.size() * 2, st);
  cudaEventRecord(ready.event, st);
  HtCombineArgs ca;
  ca.x = TensorView(y.get(), DType::kBF16, {N, H});
  ca.topk_weights = TensorView(rw.get(), DType::kF32, {N, K});
  HtCombineOutputs co;
  co.combined_x = TensorView(comb.get(), DType::kBF16, {T, H});
  co.combined_topk_weights = TensorView(comb_w.get(), DType::kF32, {T, K});
  Event combined = buf.ht_combine(ca, h, co, StreamOrder{st, ready.event, true, async_finish});
  if (async_finish) {
    combined.synchronize();
    // The host has seen the event: plain (legacy-stream) copies read the finished rows.
    cudaMemcpy(comb_seen.get(), comb.get(), comb.size() * 2, cudaMemcpyDeviceToDevice);
    cudaMemcpy(comb_w_seen.get(), comb_w.get(), comb_w.size() * 4, cudaMemcpyDeviceToDevice);
  } else {
    copy_on(comb_seen, comb, st);
    copy_on(comb_w_seen, comb_w, st);
    buf.synchronize(st);
  }
  {
    const auto got = comb_seen.download();
    const int64_t d = first_diff(got, want_comb[me].x, size_t(T) * H);
    GPU_EXPECT(d < 0, "[%s] combined_x[%lld][%lld]: expected bf16 0x%04x, got 0x%04x", mode,
               (long long)(d / H), (long long)(d % H), d < 0 ? 0 : want_comb[me].x[d], d < 0 ? 0 : got[d]);
    const std::vector<float>& want_cw = want_comb[me].topk_weights;  // every rank received rows: never empty
    GPU_EXPECT(want_cw.size() == size_t(T) * K, "[%s] the oracle summed %zu weights, not T * K", mode,
               want_cw.size());
    const auto got_cw = comb_w_seen.download();
    for (int64_t i = 0; i < int64_t(T) * K; ++i)
      GPU_EXPECT(std::fabs(got_cw[i] - want_cw[i]) <= 1e-6f,
                 "[%s] combined_topk_weights[%lld][%lld]: expected %g, got %g", mode, (long long)(i / K),
                 (long long)(i % K), want_cw[i], got_cw[i]);
  }
  if (ctx.rank == 0) std::printf("ok: HT notify + dispatch + combine on the comm stream, %s\n", mode);
  return 0;
}

// Both cases end with a plain (cudaStream_t) round on the same buffer: the comm-stream calls kept its
// rounds in step with the other ranks'.
int ht_case(const RankContext& ctx, bool async_finish) {
  Env env(ctx, ht_bytes(ctx), 0);
  for (int round = 0; round < 3; ++round)
    if (ht_round(ctx, env, env.seed + 100 * round, async_finish) != 0) return 1;
  HtHandle plain;
  return htt::run_round(ctx, kHt, env.buffer, plain, env.seed + 999, env.stream, false);
}

GPU_CASE(stream_order_ht_comm_stream_async_event_matches_oracle, 2, 240) {
  return ht_case(ctx, true);
}

GPU_CASE(stream_order_ht_comm_stream_joined_compute_stream_sees_results, 2, 240) {
  return ht_case(ctx, false);
}

// LL on the comm stream: a fused round with async_finish (x handed over by previous_event; dispatch read
// after Event::synchronize, combine after Event::wait on the compute stream), then a split round without
// it (the compute stream joined after each send half runs the receive hooks, and its own synchronize
// covers everything). Expert outputs are filled on the compute stream: the combine, given no
// previous_event, must wait for it.
GPU_CASE(stream_order_ll_comm_stream_fused_async_and_split_joined, 2, 240) {
  const int R = ctx.num_ranks;
  const LlCase c{"fp8 N=64 H=7168 top-8/288", 64, 7168, 8, 288};
  Env env(ctx, 0, llt::ll_bytes_for({c}, R));
  Buffer& buf = env.buffer;
  cudaStream_t st = env.stream;
  LlIo io(c, R, ctx.rank);
  ReadyEvent ready;
  DeviceArray<uint16_t> x_stage(io.x.size());
  for (int split = 0; split < 2; ++split) {
    const bool async_finish = !split;
    const LlRound r = llt::make_round(c, R, env.seed + 31 * split, llt::full_tokens(c, R));
    const uint64_t y_seed = env.seed + 77 + split;
    io.load(r, st);
    cudaMemcpy(x_stage.get(), io.x.get(), io.x.size() * 2, cudaMemcpyDeviceToDevice);
    io.x.poison();
    produce(io.x.get(), x_stage.get(), io.x.size() * 2, st);
    cudaEventRecord(ready.event, st);
    LlOrdered d = buf.ll_dispatch(io.dispatch_args(split), io.handle, io.dispatch_outputs(),
                                  StreamOrder{st, ready.event, true, async_finish});
    GPU_EXPECT(d.hook.valid() == bool(split) && d.event.valid() == async_finish,
               "ll_dispatch: hook %d, event %d", d.hook.valid(), d.event.valid());
    if (split) d.hook(st);
    if (async_finish)
      d.event.synchronize();
    else
      buf.synchronize(st);
    if (llt::check_dispatch(ctx, io, r) != 0) return 1;

    io.y.poison();
    hold_kernel<<<1, 1, 0, st>>>(kHoldCycles);
    io.fill_expert_outputs(y_seed, st);
    LlOrdered cmb = buf.ll_combine(io.combine_args(split), io.handle, io.combine_outputs(),
                                   StreamOrder{st, nullptr, true, async_finish});
    if (split) cmb.hook(st);
    if (async_finish) cmb.event.wait(st);
    buf.synchronize(st);
    if (llt::check_combine(ctx, io, r, y_seed) != 0) return 1;
    if (ctx.rank == 0)
      std::printf("ok: LL %s on the comm stream, %s\n", split ? "split" : "fused",
                  split ? "joined" : "async_finish");
  }
  return 0;
}

// Refused before anything is enqueued, naming the argument: a compute stream of another device, the comm
// stream while the compute stream captures, an empty Event, and synchronize on an Event recorded under
// capture. The buffer then still runs a correct round.
GPU_CASE(stream_order_rejects_other_device_stream_and_captured_comm_stream, 2, 120) {
  Env env(ctx, ht_bytes(ctx), 0);
  Buffer& buf = env.buffer;
  cudaStream_t st = env.stream;
  HtHandle h;
  const HtDispatchArgs none;
  int count = 0;
  cudaGetDeviceCount(&count);
  if (count > 1) {
    cudaStream_t other = nullptr;
    cudaSetDevice((ctx.device + 1) % count);
    cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking);
    cudaSetDevice(ctx.device);
    for (bool comm_stream : {false, true})
      if (expect_invalid(
              ctx,
              [&] {
                buf.ht_notify(none, h, Sizing::kExact, 0, StreamOrder{other, nullptr, comm_stream, false});
              },
              "stream belongs to device",
              comm_stream ? "order.stream of another device, comm stream"
                          : "order.stream of another device") != 0)
        return 1;
    cudaStreamDestroy(other);
  }

  Event empty;
  if (expect_invalid(
          ctx, [&] { empty.wait(st); }, "empty event", "Event::wait on an empty Event") != 0)
    return 1;
  if (expect_invalid(
          ctx, [&] { empty.synchronize(); }, "empty event", "Event::synchronize on an empty Event") != 0)
    return 1;

  // Under capture: the comm stream is refused; a call on the capturing stream itself is captured, and its
  // Event can be waited on inside the capture but not from the host.
  const int T = 16, K = 2, E = 8, R = ctx.num_ranks;
  DeviceArray<int64_t> idx(
      workload::make_topk_idx(T, K, E, R, workload::Routing::kUniform, env.seed, ctx.rank));
  DeviceArray<int32_t> per_rank(R), per_expert(E);
  DeviceArray<uint8_t> in_rank(size_t(T) * R);
  const TensorView idx_v(idx.get(), DType::kI64, {T, K}), per_rank_v(per_rank.get(), DType::kI32, {R}),
      per_expert_v(per_expert.get(), DType::kI32, {E}), in_rank_v(in_rank.get(), DType::kBool, {T, R});
  GPU_EXPECT(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) == cudaSuccess, "begin capture");
  const int refused = expect_invalid(
      ctx,
      [&] {
        buf.get_dispatch_layout(idx_v, E, per_rank_v, per_expert_v, in_rank_v,
                                StreamOrder{st, nullptr, true});
      },
      "order.use_comm_stream", "comm stream while order.stream captures");
  Event captured = buf.get_dispatch_layout(idx_v, E, per_rank_v, per_expert_v, in_rank_v,
                                           StreamOrder{st, nullptr, false, true});
  captured.wait(st);
  const int no_host_wait = expect_invalid(
      ctx, [&] { captured.synchronize(); }, "capturing a CUDA graph",
      "Event::synchronize on an Event recorded under capture");
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(st, &graph);
  GPU_EXPECT(ended == cudaSuccess, "end capture: %s", cudaGetErrorString(ended));
  cudaGraphDestroy(graph);
  if (refused != 0 || no_host_wait != 0) return 1;

  return htt::run_round(ctx, kHt, buf, h, env.seed + 1, st, false);
}

}  // namespace
}  // namespace expertlink::test
