// Internode HT on one host: each rank sets its own NCCL_HOSTID before creating its communicator, so NCCL
// (and ExpertLink's topology) sees several nodes and carries the "network" hop over its NET transport
// (P2P and SHM, which need one host, are off too). Dispatch is checked bitwise against the CPU oracle;
// combine bitwise where every node holds one GPU (the oracle's summation order then holds exactly), else
// within the oracle's tolerance. A second case checks that a single node keeps the intranode path.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "device_array.hpp"
#include "expertlink/buffer.hpp"
#include "expertlink/reference.hpp"
#include "expertlink/workload.hpp"
#include "harness.hpp"
#include "ht_check.hpp"

namespace expertlink::test {
namespace {

namespace ref = expertlink::reference;
using workload::Routing;

enum class Fmt { kBf16, kFp8, kFp8Ue8m0 };

struct InterCase {
  const char* name;
  int tokens, hidden, topk, experts;
  Fmt fmt = Fmt::kBf16;
  bool idx_i32 = false;
  Routing routing = Routing::kUniform;
  int masked_slots = 0;
  int empty_rank = -1;
  Sizing sizing = Sizing::kExact;
  int expert_alignment = 1;
};

int tokens_of(const InterCase& c, int rank) { return rank == c.empty_rank ? 0 : c.tokens + (rank % 3) * 5; }
DType x_dtype(Fmt f) { return f == Fmt::kBf16 ? DType::kBF16 : DType::kFP8E4M3; }

// One notify + dispatch + cached dispatch + combine round on `buffer`, checked against the oracle.
int run_round(const RankContext& ctx, Buffer& buffer, const InterCase& c, uint64_t seed, bool combine_bitwise,
              cudaStream_t stream) {
  const int R = ctx.num_ranks, me = ctx.rank, H = c.hidden, K = c.topk, E_local = c.experts / R;
  std::vector<ref::HtDispatchInput> ins(R);
  std::vector<std::vector<uint16_t>> bias0(R), bias1(R);
  for (int s = 0; s < R; ++s) {
    const int T = tokens_of(c, s);
    auto x = workload::make_bf16(size_t(T) * H, seed, s);
    ins[s].x = c.fmt == Fmt::kBf16 ? ref::bf16_rows(T, H, x)
                                   : ref::cast_to_fp8(x.data(), T, H, c.fmt == Fmt::kFp8Ue8m0, c.fmt == Fmt::kFp8Ue8m0);
    ins[s].topk_idx = workload::make_topk_idx(T, K, c.experts, R, c.routing, seed + 1, s, c.masked_slots);
    ins[s].topk_weights = workload::make_topk_weights(ins[s].topk_idx, K, seed + 2, s);
    bias0[s] = workload::make_bf16(size_t(T) * H, seed + 3, s);
    bias1[s] = workload::make_bf16(size_t(T) * H, seed + 4, s);
  }
  ref::HtDispatchParams rp;
  rp.num_experts = c.experts;
  rp.topk = K;
  rp.expert_alignment = c.expert_alignment;
  const auto want = ref::ht_dispatch(rp, ins);
  const ref::HtDispatchOutput& mine = want[me];
  const int T = tokens_of(c, me);
  const int64_t N = mine.handle.num_recv();

  const auto& xr = ins[me].x;
  std::vector<uint8_t> x_bytes = xr.is_fp8() ? xr.fp8
                                             : std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(xr.bf16.data()),
                                                                    reinterpret_cast<const uint8_t*>(xr.bf16.data() + xr.bf16.size()));
  DeviceArray<uint8_t> x_dev(x_bytes);
  DeviceArray<float> scales_dev(xr.scales);
  DeviceArray<int32_t> packed_dev(xr.packed_scales);
  std::vector<int32_t> idx32(ins[me].topk_idx.begin(), ins[me].topk_idx.end());
  DeviceArray<int64_t> idx64_dev(ins[me].topk_idx);
  DeviceArray<int32_t> idx32_dev(idx32);
  DeviceArray<float> w_dev(ins[me].topk_weights);

  HtDispatchArgs args;
  args.x = TensorView(x_dev.get(), x_dtype(c.fmt), {T, H});
  if (c.fmt == Fmt::kFp8) args.x_scales = TensorView(scales_dev.get(), DType::kF32, {T, H / 128});
  if (c.fmt == Fmt::kFp8Ue8m0) args.x_scales = TensorView(packed_dev.get(), DType::kI32, {T, (H + 511) / 512});
  args.topk_idx = c.idx_i32 ? TensorView(idx32_dev.get(), DType::kI32, {T, K}) : TensorView(idx64_dev.get(), DType::kI64, {T, K});
  args.topk_weights = TensorView(w_dev.get(), DType::kF32, {T, K});
  args.num_experts = c.experts;
  args.expert_alignment = c.expert_alignment;

  HtHandle handle;
  const int64_t capacity = c.sizing == Sizing::kExact ? N : N + 13;
  buffer.ht_notify(args, handle, c.sizing, capacity, stream);
  GPU_EXPECT(handle.num_recv_tokens() == N, "[%s] num_recv %lld, oracle %lld", c.name, (long long)handle.num_recv_tokens(),
             (long long)N);
  const int64_t rows = std::max<int64_t>(capacity, 1);
  const int scale_cols = c.fmt == Fmt::kFp8 ? H / 128 : (H + 511) / 512;
  const size_t row_bytes = size_t(H) * (c.fmt == Fmt::kBf16 ? 2 : 1);
  DeviceArray<uint8_t> rx(rows * row_bytes);
  DeviceArray<int32_t> rs(rows * scale_cols);
  DeviceArray<int64_t> ridx64(rows * K);
  DeviceArray<int32_t> ridx32(rows * K);
  DeviceArray<float> rw(rows * K);
  DeviceArray<int32_t> rcount(E_local);
  rx.poison(), rs.poison(), ridx64.poison(), ridx32.poison(), rw.poison(), rcount.poison();
  HtDispatchOutputs out;
  out.recv_x = TensorView(rx.get(), x_dtype(c.fmt), {rows, H});
  if (c.fmt != Fmt::kBf16)
    out.recv_x_scales = TensorView(rs.get(), c.fmt == Fmt::kFp8 ? DType::kF32 : DType::kI32, {rows, scale_cols});
  out.recv_topk_idx = c.idx_i32 ? TensorView(ridx32.get(), DType::kI32, {rows, K}) : TensorView(ridx64.get(), DType::kI64, {rows, K});
  out.recv_topk_weights = TensorView(rw.get(), DType::kF32, {rows, K});
  out.num_recv_tokens_per_expert = TensorView(rcount.get(), DType::kI32, {E_local});
  buffer.ht_dispatch(args, handle, out, stream);
  buffer.synchronize(stream);
  handle.check_capacity();

  // ---- dispatch: bitwise ----
  const auto got_x = rx.download(N * row_bytes);
  const uint8_t* want_x = mine.x.is_fp8() ? mine.x.fp8.data() : reinterpret_cast<const uint8_t*>(mine.x.bf16.data());
  for (int64_t i = 0; i < int64_t(N * row_bytes); ++i)
    GPU_EXPECT(got_x[i] == want_x[i], "[%s] recv_x row %lld byte %lld: expected 0x%02x, got 0x%02x (source rank %d token %d)",
               c.name, (long long)(i / row_bytes), (long long)(i % row_bytes), want_x[i], got_x[i],
               mine.handle.recv_src_rank[i / row_bytes], mine.handle.recv_src_token[i / row_bytes]);
  if (c.fmt != Fmt::kBf16) {
    const auto got_s = rs.download(N * scale_cols);
    const int32_t* want_s = c.fmt == Fmt::kFp8 ? reinterpret_cast<const int32_t*>(mine.x.scales.data()) : mine.x.packed_scales.data();
    for (int64_t i = 0; i < N * scale_cols; ++i)
      GPU_EXPECT(got_s[i] == want_s[i], "[%s] recv_x_scales row %lld col %lld: expected 0x%08x, got 0x%08x", c.name,
                 (long long)(i / scale_cols), (long long)(i % scale_cols), want_s[i], got_s[i]);
  }
  std::vector<int64_t> got_idx(N * K);
  if (c.idx_i32) {
    const auto g = ridx32.download(N * K);
    std::copy(g.begin(), g.end(), got_idx.begin());
  } else {
    got_idx = ridx64.download(N * K);
  }
  const auto got_w = rw.download(N * K);
  for (int64_t i = 0; i < N * K; ++i) {
    GPU_EXPECT(got_idx[i] == mine.topk_idx[i], "[%s] recv_topk_idx[%lld][%lld]: expected %lld, got %lld", c.name,
               (long long)(i / K), (long long)(i % K), (long long)mine.topk_idx[i], (long long)got_idx[i]);
    GPU_EXPECT(std::memcmp(&got_w[i], &mine.topk_weights[i], 4) == 0, "[%s] recv_topk_weights[%lld][%lld]: expected %g, got %g",
               c.name, (long long)(i / K), (long long)(i % K), mine.topk_weights[i], got_w[i]);
  }
  std::vector<int32_t> got_src(N);
  if (N) cudaMemcpy(got_src.data(), handle.recv_src_token(), N * 4, cudaMemcpyDeviceToHost);
  for (int64_t i = 0; i < N; ++i)
    GPU_EXPECT(got_src[i] == mine.handle.recv_src_token[i], "[%s] recv_src_token[%lld]: expected %d, got %d", c.name,
               (long long)i, mine.handle.recv_src_token[i], got_src[i]);
  std::vector<int32_t> got_prefix(R + 1);
  cudaMemcpy(got_prefix.data(), handle.rank_prefix(), (R + 1) * 4, cudaMemcpyDeviceToHost);
  for (int s = 0; s <= R; ++s)
    GPU_EXPECT(got_prefix[s] == mine.handle.rank_prefix[s], "[%s] rank_prefix[%d]: expected %d, got %d", c.name, s,
               mine.handle.rank_prefix[s], got_prefix[s]);
  const auto got_count = rcount.download();
  const auto host_count = handle.num_recv_tokens_per_expert();
  for (int j = 0; j < E_local; ++j) {
    GPU_EXPECT(got_count[j] == mine.num_recv_tokens_per_expert[j], "[%s] num_recv_tokens_per_expert[%d]: expected %d, got %d",
               c.name, j, mine.num_recv_tokens_per_expert[j], got_count[j]);
    GPU_EXPECT(host_count[j] == mine.num_recv_tokens_per_expert[j], "[%s] host per-expert count[%d]: expected %d, got %d",
               c.name, j, mine.num_recv_tokens_per_expert[j], host_count[j]);
  }

  // ---- cached dispatch (no notify, no topk_idx): new BF16 rows along the same handle ----
  if (c.fmt == Fmt::kBf16) {
    std::vector<ref::TokenRows> xs;
    std::vector<ref::HtHandle> handles;
    for (int s = 0; s < R; ++s) {
      xs.push_back(ref::bf16_rows(tokens_of(c, s), H, workload::make_bf16(size_t(tokens_of(c, s)) * H, seed + 9, s)));
      handles.push_back(want[s].handle);
    }
    const auto want_cached = ref::ht_dispatch_cached(handles, xs);
    DeviceArray<uint16_t> x2(xs[me].bf16);
    HtDispatchArgs a2;
    a2.x = TensorView(x2.get(), DType::kBF16, {T, H});
    rx.poison();
    HtDispatchOutputs o2;
    o2.recv_x = out.recv_x;
    buffer.ht_dispatch(a2, handle, o2, stream);
    buffer.synchronize(stream);
    const auto g2 = rx.download(N * row_bytes);
    const uint8_t* w2 = reinterpret_cast<const uint8_t*>(want_cached[me].bf16.data());
    for (int64_t i = 0; i < int64_t(N * row_bytes); ++i)
      GPU_EXPECT(g2[i] == w2[i], "[%s] cached dispatch recv_x row %lld byte %lld: expected 0x%02x, got 0x%02x", c.name,
                 (long long)(i / row_bytes), (long long)(i % row_bytes), w2[i], g2[i]);
  }

  // ---- combine: expert outputs back, with weights and both biases ----
  std::vector<ref::HtCombineInput> cins(R);
  std::vector<ref::HtHandle> handles;
  for (int d = 0; d < R; ++d) {
    cins[d].x = workload::make_bf16(size_t(want[d].handle.num_recv()) * H, seed + 5, d);
    cins[d].topk_weights = want[d].topk_weights;
    cins[d].bias0 = bias0[d];
    cins[d].bias1 = bias1[d];
    handles.push_back(want[d].handle);
  }
  const auto want_comb = ref::ht_combine_explicit(handles, cins, H, /*sum_topk_weights=*/true);
  DeviceArray<uint16_t> y(size_t(rows) * H), b0(bias0[me]), b1(bias1[me]);
  y.poison();
  y.upload(cins[me].x);
  DeviceArray<uint16_t> comb(size_t(T) * H);
  DeviceArray<float> comb_w(size_t(T) * K);
  comb.poison(), comb_w.poison();
  HtCombineArgs ca;
  const int64_t y_rows = c.sizing == Sizing::kExact ? N : rows;
  ca.x = TensorView(y.get(), DType::kBF16, {y_rows, H});
  ca.topk_weights = TensorView(rw.get(), DType::kF32, {y_rows, K});
  ca.bias0 = TensorView(b0.get(), DType::kBF16, {T, H});
  ca.bias1 = TensorView(b1.get(), DType::kBF16, {T, H});
  HtCombineOutputs co;
  co.combined_x = TensorView(comb.get(), DType::kBF16, {T, H});
  co.combined_topk_weights = TensorView(comb_w.get(), DType::kF32, {T, K});
  buffer.ht_combine(ca, handle, co, stream);
  buffer.synchronize(stream);
  const auto got_c = comb.download();
  const auto got_cw = comb_w.download();
  int64_t inexact = 0;
  for (int64_t i = 0; i < int64_t(T) * H; ++i) {
    const float g = ref::bf16_to_float(got_c[i]), w = ref::bf16_to_float(want_comb[me].x[i]);
    if (got_c[i] != want_comb[me].x[i]) ++inexact;
    GPU_EXPECT(std::fabs(g - w) <= 2e-2f * std::fabs(w) + 2e-2f, "[%s] combined_x[%lld][%lld]: expected %g, got %g", c.name,
               (long long)(i / H), (long long)(i % H), w, g);
    GPU_EXPECT(!combine_bitwise || got_c[i] == want_comb[me].x[i],
               "[%s] combined_x[%lld][%lld]: expected bits 0x%04x (%g), got 0x%04x (%g): one GPU per node must sum "
               "in the oracle's order", c.name, (long long)(i / H), (long long)(i % H), want_comb[me].x[i], w, got_c[i], g);
  }
  const std::vector<float>& want_cw = want_comb[me].topk_weights;
  for (int64_t i = 0; i < int64_t(T) * K; ++i)
    GPU_EXPECT(combine_bitwise ? std::memcmp(&got_cw[i], &want_cw[i], 4) == 0 : std::fabs(got_cw[i] - want_cw[i]) <= 1e-6f,
               "[%s] combined_topk_weights[%lld][%lld]: expected %g, got %g", c.name, (long long)(i / K),
               (long long)(i % K), want_cw[i], got_cw[i]);
  std::printf("[rank %d] %-34s T=%d N=%lld: dispatch bitwise, combine %s (%lld inexact of %lld)\n", me, c.name, T,
              (long long)N, inexact == 0 ? "bitwise" : "within tolerance", (long long)inexact, (long long)T * H);
  return 0;
}

// Each rank claims its emulated node before NCCL starts: node = rank / local, host id per node.
void emulate_nodes(int rank, int local) {
  const std::string id = "expertlink-emulated-node-" + std::to_string(rank / local);
  setenv("NCCL_HOSTID", id.c_str(), 1);
  setenv("NCCL_P2P_DISABLE", "1", 0);
  setenv("NCCL_SHM_DISABLE", "1", 0);
  setenv("NCCL_IB_DISABLE", "1", 0);  // the socket NET transport, whatever NICs the host has
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  setenv("NCCL_SOCKET_IFNAME", "lo", 0);  // one host: loopback reaches every "node"
}

}  // namespace

// 2 nodes (R / 2 GPUs each; 1 with two GPUs): dispatch+combine vs the oracle, BF16 and FP8 (float and
// UE8M0 scales), random routing with -1 slots, an empty rank, i32 ids, skewed routing, capacity sizing,
// and the HT hidden size.
GPU_CASE(internode_2nodes_x1_bf16_fp8_exact, 2, 240) {
  const int R = ctx.num_ranks;
  GPU_EXPECT(R % 2 == 0, "needs an even number of ranks, got %d", R);
  const int local = R / 2;
  emulate_nodes(ctx.rank, local);
  Communicator comm(ctx.id, ctx.rank, R, ctx.device);
  const int64_t max_tokens = 1100;
  Buffer buffer(comm, Buffer::ht_size_hint(R, max_tokens, 7168, 8));
  GPU_EXPECT(buffer.num_nodes() == 2 && buffer.num_local_ranks() == local,
             "topology: %d nodes x %d local ranks, expected 2 x %d (NCCL_HOSTID per rank)", buffer.num_nodes(),
             buffer.num_local_ranks(), local);
  GPU_EXPECT(buffer.window_bytes() == 0, "the internode path holds no symmetric window, got %zu bytes",
             buffer.window_bytes());
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  const uint64_t seed = run_seed(ctx.id);
  const bool bitwise = local == 1;
  const InterCase cases[] = {
      {"bf16_uniform_masked", 300, 2048, 8, 16 * R, Fmt::kBf16, false, Routing::kUniform, 60},
      {"fp8_f32_scales_masked", 300, 2048, 8, 16 * R, Fmt::kFp8, false, Routing::kUniform, 60},
      {"fp8_ue8m0_i32_ids", 257, 1024, 4, 8 * R, Fmt::kFp8Ue8m0, true, Routing::kUniform, 30},
      {"bf16_skewed_empty_rank1", 200, 1024, 8, 32 * R, Fmt::kBf16, false, Routing::kSkewed, 20, 1},
      {"fp8_capacity_aligned", 180, 2048, 6, 12 * R, Fmt::kFp8, false, Routing::kUniform, 10, -1, Sizing::kCapacity, 4},
      {"bf16_topk1_all_masked_rank0", 64, 512, 1, 2 * R, Fmt::kBf16, false, Routing::kUniform, 64 + 5},
      {"fp8_ht_hidden_7168", 1024, 7168, 8, 128 * R, Fmt::kFp8, false, Routing::kUniform, 0},
      {"bf16_ht_hidden_7168", 1024, 7168, 8, 128 * R, Fmt::kBf16, false, Routing::kUniform, 0},
  };
  int round = 0;
  for (const InterCase& c : cases)
    if (int rc = run_round(ctx, buffer, c, seed + 1000 * round++, bitwise, stream); rc != 0) return rc;
  // The same buffer and handle machinery again, after everything (staging reused, no growth needed).
  if (int rc = run_round(ctx, buffer, cases[0], seed + 77, bitwise, stream); rc != 0) return rc;
  std::printf("[rank %d] internode: %d nodes x %d, staging %zu bytes\n", ctx.rank, buffer.num_nodes(),
              buffer.num_local_ranks(), buffer.internode_staging_bytes());
  cudaStreamDestroy(stream);
  return 0;
}

// One node (no NCCL_HOSTID difference): the intranode path, its symmetric window, unchanged results.
GPU_CASE(internode_single_node_takes_intranode_path, 2, 120) {
  unsetenv("NCCL_HOSTID");
  Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  Buffer buffer(comm, Buffer::ht_size_hint(ctx.num_ranks, 400, 2048, 8));
  GPU_EXPECT(buffer.num_nodes() == 1 && buffer.num_local_ranks() == ctx.num_ranks,
             "topology: %d nodes x %d local ranks, expected 1 x %d", buffer.num_nodes(), buffer.num_local_ranks(),
             ctx.num_ranks);
  GPU_EXPECT(buffer.window_bytes() > 0, "the intranode path must hold a symmetric window");
  GPU_EXPECT(buffer.internode_staging_bytes() == 0, "no internode staging expected, got %zu",
             buffer.internode_staging_bytes());
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  const InterCase c{"intranode_bf16_masked", 300, 2048, 8, 16 * ctx.num_ranks, Fmt::kBf16, false,
                    Routing::kUniform, 40};
  // The intranode kernels sum in the oracle's order: bitwise.
  if (int rc = run_round(ctx, buffer, c, run_seed(ctx.id), /*combine_bitwise=*/true, stream); rc != 0) return rc;
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace expertlink::test
