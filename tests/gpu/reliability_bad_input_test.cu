// Bad arguments (issue 6): on one Buffer with both regions, every kind of bad call is refused with an
// invalid-argument Error whose message names the argument or the value, and after each one the same Buffer
// still gives the oracle's results (an HT notify + dispatch + combine round and an LL fused round).
// Every rank makes the same bad calls in the same order: a refused call launches nothing, so no rank is left
// waiting. The out-of-range expert ids are the exception: only the kernels see them (they sit in device
// memory); the calls run on every rank, the ids are ignored, and the error comes from the flags the kernels
// leave (HT: the exact-sizing notify itself raises; LL: the next LL call on the buffer raises).
#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "ht_check.hpp"
#include "ll_check.hpp"

namespace expertlink::test {
namespace {

using htt::HtCase;
using llt::LlCase;
using llt::LlIo;

struct Kind {
  const char* what;    // the mistake
  const char* needle;  // what the message must contain
  std::function<void()> call;
};

GPU_CASE(reliability_bad_arguments_refused_buffer_still_correct, 2, 300) {
  const int R = ctx.num_ranks, me = ctx.rank;
  int devices = 0;
  cudaGetDeviceCount(&devices);
  const int other_device = (ctx.device + 1) % devices;
  GPU_EXPECT(other_device != ctx.device, "two visible GPUs per process (the wrong-device kinds need one)");

  const HtCase ht_good{"bf16 T=32 H=512 top-4/16", 32, 512, 4, 16};
  LlCase ll_good{"fp8 N=16 H=512 top-4/16", 16, 512, 4, 16};
  const size_t ht_bytes = Buffer::ht_size_hint(R, 64, 512, 8);
  const size_t ll_bytes = llt::ll_bytes_for({ll_good}, R);
  Communicator comm(ctx.id, me, R, ctx.device);
  Buffer buffer(comm, ht_bytes, ll_bytes);
  Buffer other(comm, ht_bytes, ll_bytes);  // the source of foreign handles
  cudaStream_t st, other_stream;
  cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
  cudaSetDevice(other_device);
  cudaStreamCreateWithFlags(&other_stream, cudaStreamNonBlocking);
  cudaSetDevice(ctx.device);
  const uint64_t seed = run_seed(ctx.id);
  if (me == 0) std::printf("seed %llu\n", static_cast<unsigned long long>(seed));

  // The correct rounds run after every refusal.
  HtHandle ht_handle;
  LlIo io(ll_good, R, me);
  int verified = 0;
  auto verify = [&]() -> int {
    const uint64_t s = seed + 7919ull * ++verified;
    if (htt::run_round(ctx, ht_good, buffer, ht_handle, s, st, false) != 0) return 1;
    return llt::run_fused(ctx, buffer, st, io, llt::make_round(ll_good, R, s, llt::full_tokens(ll_good, R)),
                          s + 1);
  };
  if (verify() != 0) return 1;

  // HT inputs of this rank's shape (the handle of the last correct round matches them).
  const int T = htt::tokens_of(ht_good, me), H = ht_good.hidden, K = ht_good.topk, E = ht_good.experts;
  const auto idx_host = workload::make_topk_idx(T, K, E, R, workload::Routing::kUniform, seed + 3, me);
  DeviceArray<uint16_t> x(workload::make_bf16(size_t(T) * H, seed + 4, me)), wide(size_t(T) * 8192);
  DeviceArray<int64_t> idx(idx_host), idx33(size_t(T) * 33);
  DeviceArray<float> w(workload::make_topk_weights(idx_host, K, seed + 5, me)), f32(size_t(T) * H);
  DeviceArray<uint8_t> fp8(size_t(T) * H);
  DeviceArray<uint16_t> recv(size_t(4) * 64 * H), comb(size_t(T) * H);
  std::vector<uint16_t> pageable(size_t(T) * H);
  uint16_t* x_other = nullptr;
  cudaSetDevice(other_device);
  cudaMalloc(&x_other, size_t(T) * H * 2);
  cudaSetDevice(ctx.device);
  auto ht_args = [&] {
    HtDispatchArgs a;
    a.x = TensorView(x.get(), DType::kBF16, {T, H});
    a.topk_idx = TensorView(idx.get(), DType::kI64, {T, K});
    a.topk_weights = TensorView(w.get(), DType::kF32, {T, K});
    a.num_experts = E;
    return a;
  };
  auto ht_out = [&] {
    HtDispatchOutputs o;
    o.recv_x = TensorView(recv.get(), DType::kBF16, {ht_handle.num_recv_tokens(), H});
    return o;
  };
  auto ht_comb_args = [&] {
    HtCombineArgs a;
    a.x = TensorView(recv.get(), DType::kBF16, {ht_handle.num_recv_tokens(), H});
    return a;
  };
  auto ht_comb_out = [&] {
    HtCombineOutputs o;
    o.combined_x = TensorView(comb.get(), DType::kBF16, {T, H});
    return o;
  };
  HtHandle scratch, never_filled, foreign;
  auto notify = [&](const HtDispatchArgs& a) { buffer.ht_notify(a, scratch, Sizing::kExact, 0, st); };
  auto dispatch = [&](const HtDispatchArgs& a, const HtDispatchOutputs& o) {
    buffer.ht_dispatch(a, ht_handle, o, st);
  };
  auto combine = [&](const HtCombineArgs& a, const HtCombineOutputs& o) {
    buffer.ht_combine(a, ht_handle, o, st);
  };
  // LL: this rank's inputs of ll_good are in `io` after each correct round.
  LlIo io2(ll_good, R, me), io3(ll_good, R, me), io4(ll_good, R, me);  // io4: foreign handle
  DeviceArray<uint16_t> x17(size_t(17) * 512);
  DeviceArray<int64_t> idx17(size_t(16) * 17);
  auto ll_dispatch = [&](const LlDispatchArgs& a, const LlDispatchOutputs& o) {
    buffer.ll_dispatch(a, io.handle, o, st);
  };
  auto ll_combine = [&](const LlCombineArgs& a, const LlCombineOutputs& o) {
    buffer.ll_combine(a, io.handle, o, st);
  };

  std::vector<Kind> kinds = {
      // ---- HT notify: refused before the notify kernel ----
      {"HT x not given", "x is required",
       [&] {
         auto a = ht_args();
         a.x = TensorView();
         notify(a);
       }},
      {"HT x.data null", "x.data is null",
       [&] {
         auto a = ht_args();
         a.x = TensorView(nullptr, DType::kBF16, {T, H});
         notify(a);
       }},
      {"HT x negative extent", "extent -1",
       [&] {
         auto a = ht_args();
         a.x = TensorView(x.get(), DType::kBF16, {-1, H});
         notify(a);
       }},
      {"HT x dtype f32", "x must be bf16 or fp8_e4m3, got f32",
       [&] {
         auto a = ht_args();
         a.x = TensorView(f32.get(), DType::kF32, {T, H});
         notify(a);
       }},
      {"HT x inner stride 2", "x rows must be contiguous",
       [&] {
         auto a = ht_args();
         a.x = TensorView(x.get(), DType::kBF16, {T, H / 2}, {H, 2});
         notify(a);
       }},
      {"HT fp8 hidden 144 (not a multiple of 128)", "hidden = 144",
       [&] {
         auto a = ht_args();
         a.x = TensorView(fp8.get(), DType::kFP8E4M3, {T, 144});
         notify(a);
       }},
      {"HT topk_idx dtype f32", "topk_idx must be i64 or i32",
       [&] {
         auto a = ht_args();
         a.topk_idx = TensorView(w.get(), DType::kF32, {T, K});
         notify(a);
       }},
      {"HT topk_idx rows != tokens", "topk_idx has",
       [&] {
         auto a = ht_args();
         a.topk_idx = TensorView(idx.get(), DType::kI64, {T - 1, K});
         notify(a);
       }},
      {"HT top-k 33 > 32", "top-k = 33",
       [&] {
         auto a = ht_args();
         a.topk_idx = TensorView(idx33.get(), DType::kI64, {T, 33});
         a.topk_weights = {};
         notify(a);
       }},
      {"HT num_experts 15 not divisible by 2 ranks", "num_experts = 15",
       [&] {
         auto a = ht_args();
         a.num_experts = 15;
         notify(a);
       }},
      {"HT num_experts 2048 > 1024", "num_experts = 2048",
       [&] {
         auto a = ht_args();
         a.num_experts = 2048;
         notify(a);
       }},
      {"HT expert_alignment 0", "expert_alignment = 0",
       [&] {
         auto a = ht_args();
         a.expert_alignment = 0;
         notify(a);
       }},
      {"HT capacity -5", "capacity = -5",
       [&] { buffer.ht_notify(ht_args(), scratch, Sizing::kCapacity, -5, st); }},
      {"HT buffer too small for hidden 8192", "ht_size_hint",
       [&] {
         auto a = ht_args();
         a.x = TensorView(wide.get(), DType::kBF16, {T, 8192});
         notify(a);
       }},
      {"HT x on the other GPU", "lives on device",
       [&] {
         auto a = ht_args();
         a.x = TensorView(x_other, DType::kBF16, {T, H});
         notify(a);
       }},
      {"HT x in pageable host memory", "not memory a GPU can reach",
       [&] {
         auto a = ht_args();
         a.x = TensorView(pageable.data(), DType::kBF16, {T, H});
         notify(a);
       }},
      {"HT stream of the other GPU", "stream belongs to device",
       [&] { buffer.ht_notify(ht_args(), scratch, Sizing::kExact, 0, other_stream); }},
      // ---- HT dispatch along the last correct round's handle: refused before the dispatch kernel ----
      {"HT handle never filled", "handle was not filled",
       [&] { buffer.ht_dispatch(ht_args(), never_filled, ht_out(), st); }},
      {"HT handle from another Buffer", "a handle belongs to one Buffer",
       [&] { buffer.ht_dispatch(ht_args(), foreign, ht_out(), st); }},
      {"HT bf16 x with x_scales", "x_scales must not be given",
       [&] {
         auto a = ht_args();
         a.x_scales = TensorView(f32.get(), DType::kF32, {T, H / 128});
         dispatch(a, ht_out());
       }},
      {"HT fp8 x without x_scales", "x_scales is required",
       [&] {
         auto a = ht_args();
         a.x = TensorView(fp8.get(), DType::kFP8E4M3, {T, H});
         dispatch(a, ht_out());
       }},
      {"HT fp8 x_scales [T, 3]", "x_scales must be",
       [&] {
         auto a = ht_args();
         a.x = TensorView(fp8.get(), DType::kFP8E4M3, {T, H});
         a.x_scales = TensorView(f32.get(), DType::kF32, {T, 3});
         dispatch(a, ht_out());
       }},
      {"HT x tokens != the handle's", "the handle was made for",
       [&] {
         auto a = ht_args();
         a.x = TensorView(x.get(), DType::kBF16, {T - 1, H});
         a.topk_idx = TensorView(idx.get(), DType::kI64, {T - 1, K});
         a.topk_weights = {};
         dispatch(a, ht_out());
       }},
      {"HT topk_weights [T, K+1]", "topk_weights must be",
       [&] {
         auto a = ht_args();
         a.topk_weights = TensorView(w.get(), DType::kF32, {T, K + 1});
         dispatch(a, ht_out());
       }},
      {"HT recv_x one row short", "recv_x holds",
       [&] {
         auto o = ht_out();
         o.recv_x = TensorView(recv.get(), DType::kBF16, {ht_handle.num_recv_tokens() - 1, H});
         dispatch(ht_args(), o);
       }},
      {"HT recv_x dtype f32", "recv_x must be bf16",
       [&] {
         auto o = ht_out();
         o.recv_x.dtype = DType::kF32;
         dispatch(ht_args(), o);
       }},
      {"HT num_sms 100000", "num_sms = 100000",
       [&] {
         auto a = ht_args();
         a.num_sms = 100000;
         dispatch(a, ht_out());
       }},
      // ---- HT combine ----
      {"HT combine x dtype f32", "combine x must be bf16",
       [&] {
         auto a = ht_comb_args();
         a.x.dtype = DType::kF32;
         combine(a, ht_comb_out());
       }},
      {"HT combine x fewer rows than received", "received row count",
       [&] {
         auto a = ht_comb_args();
         a.x.shape[0] -= 1;
         combine(a, ht_comb_out());
       }},
      {"HT combined_x [T, H + 8]", "combined_x must be",
       [&] {
         auto o = ht_comb_out();
         o.combined_x = TensorView(comb.get(), DType::kBF16, {T, H + 8});
         combine(ht_comb_args(), o);
       }},
      {"HT bias0 [T - 1, H]", "bias0 must be",
       [&] {
         auto a = ht_comb_args();
         a.bias0 = TensorView(comb.get(), DType::kBF16, {T - 1, H});
         combine(a, ht_comb_out());
       }},
      // ---- LL dispatch: refused before the kernel ----
      {"LL T = 17 > N = 16", "num_max_dispatch_tokens_per_rank = 16",
       [&] {
         auto a = io.dispatch_args(false);
         a.x = TensorView(x17.get(), DType::kBF16, {17, 512});
         a.topk_idx = TensorView(idx17.get(), DType::kI64, {17, 4});
         ll_dispatch(a, io.dispatch_outputs());
       }},
      {"LL N = 2000 > 1024", "num_max_dispatch_tokens_per_rank = 2000",
       [&] {
         auto a = io.dispatch_args(false);
         a.num_max_dispatch_tokens_per_rank = 2000;
         ll_dispatch(a, io.dispatch_outputs());
       }},
      {"LL top-k 17 > 16", "top-k = 17",
       [&] {
         auto a = io.dispatch_args(false);
         a.topk_idx = TensorView(idx17.get(), DType::kI64, {io.tokens, 17});
         ll_dispatch(a, io.dispatch_outputs());
       }},
      {"LL num_experts 15 not divisible by 2 ranks", "num_experts = 15",
       [&] {
         auto a = io.dispatch_args(false);
         a.num_experts = 15;
         ll_dispatch(a, io.dispatch_outputs());
       }},
      {"LL fp8 hidden 200", "hidden = 200 must be a multiple of 128",
       [&] {
         auto a = io.dispatch_args(false);
         a.x = TensorView(io.x.get(), DType::kBF16, {8, 200});
         a.topk_idx.shape[0] = 8;
         ll_dispatch(a, io.dispatch_outputs());
       }},
      {"LL use_ue8m0 without round_scale", "round_scale",
       [&] {
         auto a = io.dispatch_args(false);
         a.options.use_ue8m0 = true;
         ll_dispatch(a, io.dispatch_outputs());
       }},
      {"LL recv_x one slot short", "recv_x must be",
       [&] {
         auto o = io.dispatch_outputs();
         o.recv_x.shape[1] -= 1;
         ll_dispatch(io.dispatch_args(false), o);
       }},
      {"LL fp8 without recv_scales", "recv_scales must be",
       [&] {
         auto o = io.dispatch_outputs();
         o.recv_scales = TensorView();
         ll_dispatch(io.dispatch_args(false), o);
       }},
      {"LL recv_count null", "recv_count.data is null",
       [&] {
         auto o = io.dispatch_outputs();
         o.recv_count.data = nullptr;
         ll_dispatch(io.dispatch_args(false), o);
       }},
      {"LL x on the other GPU", "lives on device",
       [&] {
         auto a = io.dispatch_args(false);
         a.x = TensorView(x_other, DType::kBF16, {io.tokens, 512});
         ll_dispatch(a, io.dispatch_outputs());
       }},
      {"LL stream of the other GPU", "stream belongs to device",
       [&] { buffer.ll_dispatch(io.dispatch_args(false), io.handle, io.dispatch_outputs(), other_stream); }},
      {"LL third call in flight", "third call in flight",
       [&] {
         LlRecvHook h2 = buffer.ll_dispatch(io2.dispatch_args(true), io2.handle, io2.dispatch_outputs(), st);
         LlRecvHook h3 = buffer.ll_dispatch(io3.dispatch_args(true), io3.handle, io3.dispatch_outputs(), st);
         try {
           ll_dispatch(io.dispatch_args(false), io.dispatch_outputs());
         } catch (...) {
           h2(st);
           h3(st);
           throw;
         }
       }},
      {"LL combine before the dispatch hook", "receive hook has not been called",
       [&] {
         LlRecvHook h2 = buffer.ll_dispatch(io2.dispatch_args(true), io2.handle, io2.dispatch_outputs(), st);
         try {
           buffer.ll_combine(io2.combine_args(false), io2.handle, io2.combine_outputs(), st);
         } catch (...) {
           h2(st);
           throw;
         }
       }},
      // ---- LL combine along the last correct round's handle ----
      {"LL handle from another Buffer", "a handle belongs to one Buffer",
       [&] { buffer.ll_combine(io4.combine_args(false), io4.handle, io4.combine_outputs(), st); }},
      {"LL topk_weights [T, K + 1]", "topk_weights must be",
       [&] {
         auto a = io.combine_args(false);
         a.topk_weights.shape[1] += 1;
         ll_combine(a, io.combine_outputs());
       }},
      {"LL zero_copy before get_next_ll_combine_buffer", "get_next_ll_combine_buffer",
       [&] { ll_combine(io.combine_args(false, true), io.combine_outputs()); }},
      {"LL combine out in pageable host memory", "not memory a GPU can reach",
       [&] {
         auto o = io.combine_outputs();
         o.out = TensorView(pageable.data(), DType::kBF16, {io.tokens, 512});
         ll_combine(io.combine_args(false), o);
       }},
  };

  // Foreign handles: filled by `other` (collective calls there, every rank).
  {
    other.ht_notify(ht_args(), foreign, Sizing::kExact, 0, st);
    io4.load(llt::make_round(ll_good, R, seed + 11, llt::full_tokens(ll_good, R)), st);
    other.ll_dispatch(io4.dispatch_args(false), io4.handle, io4.dispatch_outputs(), st);
    other.synchronize(st);
    io2.load(llt::make_round(ll_good, R, seed + 12, llt::full_tokens(ll_good, R)), st);
    io3.load(llt::make_round(ll_good, R, seed + 13, llt::full_tokens(ll_good, R)), st);
  }
  int refused = 0;
  for (Kind& k : kinds) {
    if (expect_invalid(ctx, k.call, k.needle, k.what) != 0) return 1;
    buffer.synchronize(st);  // the split calls some kinds complete
    if (verify() != 0) {
      std::fprintf(stderr, "[rank %d] the buffer gave a wrong result after: %s\n", me, k.what);
      return 1;
    }
    ++refused;
  }

  // Expert ids outside [-1, E): in device memory, so found by the kernels and raised from their flags.
  int device_found = 0;
  for (const int64_t bad : {int64_t{999}, int64_t{-5}}) {
    std::vector<int64_t> ids = idx_host;
    ids[std::min<size_t>(7, ids.size() - 1)] = bad;
    idx.upload(ids);
    const std::string needle = "= " + std::to_string(bad);
    if (expect_invalid(
            ctx, [&] { notify(ht_args()); }, needle.c_str(), "HT expert id out of range (exact notify)") != 0)
      return 1;
    idx.upload(idx_host);
    if (verify() != 0) return 1;
    ++device_found;
  }
  for (const int64_t bad : {int64_t{999}, int64_t{-7}}) {
    // io holds the last correct round's inputs; one of its ids is made bad, the dispatch runs everywhere.
    std::vector<int64_t> ids = io.idx64.download(size_t(io.tokens) * ll_good.topk);
    const std::vector<int64_t> good_ids = ids;
    ids[3] = bad;
    io.idx64.upload(ids);
    ll_dispatch(io.dispatch_args(false), io.dispatch_outputs());
    buffer.synchronize(st);
    io.idx64.upload(good_ids);
    const std::string needle = "= " + std::to_string(bad);
    if (expect_invalid(
            ctx, [&] { ll_dispatch(io.dispatch_args(false), io.dispatch_outputs()); }, needle.c_str(),
            "LL expert id out of range (raised by the next LL call)") != 0)
      return 1;
    if (verify() != 0) return 1;
    ++device_found;
  }
  cudaFree(x_other);
  cudaStreamDestroy(other_stream);
  cudaStreamDestroy(st);
  if (me == 0)
    std::printf(
        "FIGURE bad input: %d kinds refused before any kernel ran + %d out-of-range expert ids found by the "
        "kernels and raised; the same Buffer matched the oracle after each (%d HT + %d LL rounds)\n",
        refused, device_found, verified, verified);
  return 0;
}

}  // namespace
}  // namespace expertlink::test
