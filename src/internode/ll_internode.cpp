// Host side of the internode LL path: staging ownership, the per-call kernel launches and the NCCL
// exchanges between them. Every message size is a pair of ll_layout.hpp, known on both sides from the
// call's arguments, so each hop is one grouped ncclSend/ncclRecv enqueued without any host wait.
#include "internode/ll_internode.hpp"

#include <vector>

#include "check.hpp"
#include "internode/ll_internode_kernels.hpp"
#include "internode/transport.hpp"

namespace expertlink::internode {

// Areas: 0, 1 dispatch parity 0, 1; 2, 3 combine parity 0, 1 (ll_layout.hpp).
constexpr int kAreas = 4;

struct LlContext {
  Topology topo;
  int grid = 0;  // blocks of the warp-per-unit kernels
  size_t ll_bytes = 0;
  std::unique_ptr<Transport> transport;
  char* send = nullptr;         // [ll_bytes]: four areas
  char* recv = nullptr;         // [ll_bytes]: four areas
  int32_t* words = nullptr;     // [2][kLlMaxTokens * kLlMaxTopk]: route -> pack scratch, per dispatch parity
  int32_t* mismatch = nullptr;  // host-mapped [kLlMismatchWords]
  int32_t* mismatch_dev = nullptr;
  // The last receive half of each area, when it ran outside graph capture: a later call of that area on
  // another stream waits for it before its kernels and NCCL rewrite the area's staging.
  cudaEvent_t done[kAreas] = {};
  cudaStream_t done_stream[kAreas] = {};
  std::vector<Message> sends, recvs;  // reused per exchange

  LlContext() = default;
  LlContext(const LlContext&) = delete;
  LlContext& operator=(const LlContext&) = delete;
  ~LlContext() {
    cudaFree(send);
    cudaFree(recv);
    cudaFree(words);
    if (mismatch != nullptr) cudaFreeHost(mismatch);
    for (cudaEvent_t e : done)
      if (e != nullptr) cudaEventDestroy(e);
  }
};

std::shared_ptr<LlContext> make_ll_context(const Communicator& comm, const Topology& topo, size_t ll_bytes,
                                           int grid) {
  auto ctx = std::make_shared<LlContext>();
  ctx->topo = topo;
  ctx->grid = grid;
  ctx->ll_bytes = ll_bytes;
  ctx->transport = make_nccl_p2p_transport(comm.nccl());
  EL_CUDA_CHECK(cudaMalloc(&ctx->send, ll_bytes));
  EL_CUDA_CHECK(cudaMalloc(&ctx->recv, ll_bytes));
  EL_CUDA_CHECK(cudaMemset(ctx->send, 0, ll_bytes));
  EL_CUDA_CHECK(cudaMemset(ctx->recv, 0, ll_bytes));
  EL_CUDA_CHECK(cudaMalloc(&ctx->words, sizeof(int32_t) * 2 * kLlMaxTokens * kLlMaxTopk));
  EL_CUDA_CHECK(cudaHostAlloc(&ctx->mismatch, sizeof(int32_t) * kLlMismatchWords, cudaHostAllocMapped));
  for (int i = 0; i < kLlMismatchWords; ++i) ctx->mismatch[i] = 0;
  EL_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ctx->mismatch_dev), ctx->mismatch, 0));
  for (cudaEvent_t& e : ctx->done) EL_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return ctx;
}

size_t ll_staging_bytes(const LlContext& ctx) {
  return 2 * ctx.ll_bytes;
}

int64_t ll_staging_area_bytes(const LlContext& ctx) {
  return ll_area_bytes(static_cast<int64_t>(ctx.ll_bytes));
}

void ll_raise_errors(LlContext& ctx) {
  volatile int32_t* f = ctx.mismatch;
  if (f[0] != 2) return;
  const int source = f[1], field = f[2], got = f[3], ours = f[4];
  f[0] = 0;  // reported once
  static const char* const kFields[] = {"hidden", "topk", "num_experts"};
  EL_FAIL(
      ErrorCode::kInvalidArgument,
      "an earlier LL call on this buffer (rank %d) received from rank %d a call with %s = %d, but this rank "
      "passed %s = %d: every rank must make the same LL calls with the same hidden, top-k and num_experts "
      "(that rank's rows were dropped)",
      ctx.topo.rank, source, field >= 0 && field < 3 ? kFields[field] : "?", got,
      field >= 0 && field < 3 ? kFields[field] : "?", ours);
}

LlLayout ll_layout_of(const kernels::LlGeometry& g, bool fp8, bool ue8m0) {
  return make_ll_layout(g.num_ranks, g.capacity, g.hidden, g.topk, g.num_experts, fp8, ue8m0);
}

namespace {

LlAreas areas_of(const LlContext& ctx, int area) {
  const int64_t bytes = ll_staging_area_bytes(ctx);
  return {ctx.send + area * bytes, ctx.recv + area * bytes};
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  EL_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Before a call rewrites `area`: order it after the last receive half that read the area when that ran
// on another stream (a hook called on another stream, or a StreamOrder call on the comm stream). Under
// graph capture the caller's stream order is relied on (an event of outside the capture cannot be waited
// on inside it): docs/internode.md.
void order_after_last_use(LlContext& ctx, int area, cudaStream_t stream) {
  cudaStream_t last = ctx.done_stream[area];
  if (last == nullptr || last == stream || capturing(stream)) return;
  EL_CUDA_CHECK(cudaStreamWaitEvent(stream, ctx.done[area], 0));
}

void mark_used(LlContext& ctx, int area, cudaStream_t stream) {
  if (capturing(stream)) {
    ctx.done_stream[area] = nullptr;
    return;
  }
  EL_CUDA_CHECK(cudaEventRecord(ctx.done[area], stream));
  ctx.done_stream[area] = stream;
}

// One hop: this rank's pair of every other rank (at offset + peer * pair_bytes of the send area) goes to
// that rank, whose pair of this rank arrives at the same place of the receive area. This rank's own pair
// was written into the receive area by the kernels.
void exchange(LlContext& ctx, const LlAreas& a, int64_t offset, int64_t pair_bytes, cudaStream_t stream) {
  ctx.sends.clear();
  ctx.recvs.clear();
  for (int peer = 0; peer < ctx.topo.num_ranks; ++peer) {
    if (peer == ctx.topo.rank) continue;
    const int64_t at = offset + int64_t(peer) * pair_bytes;
    ctx.sends.push_back({peer, a.send + at, static_cast<size_t>(pair_bytes)});
    ctx.recvs.push_back({peer, a.recv + at, static_cast<size_t>(pair_bytes)});
  }
  ctx.transport->exchange(ctx.sends, ctx.recvs, stream);
}

LlIndex index_of(const void* data, kernels::IdxType type, int64_t rs, int64_t cs) {
  return {data, type, rs, cs};
}

}  // namespace

void ll_dispatch_send(LlContext& ctx, const kernels::LlDispatchParams& p, cudaStream_t stream) {
  const LlLayout l = ll_layout_of(p.g, p.fp8, p.ue8m0);
  EL_CHECK(l.dispatch_bytes() <= ll_staging_area_bytes(ctx), "internal: LL dispatch of %lld bytes, area %lld",
           static_cast<long long>(l.dispatch_bytes()), static_cast<long long>(ll_staging_area_bytes(ctx)));
  order_after_last_use(ctx, p.parity, stream);
  const LlAreas a = areas_of(ctx, p.parity);
  const LlIndex idx = index_of(p.topk_idx, p.idx_type, p.idx_row_stride, p.idx_col_stride);
  int32_t* words = ctx.words + int64_t(p.parity) * kLlMaxTokens * kLlMaxTopk;

  LlRouteParams rp{};
  rp.l = l;
  rp.rank = ctx.topo.rank;
  rp.num_tokens = p.num_tokens;
  rp.idx = idx;
  rp.areas = a;
  rp.words = words;
  rp.bad_expert = p.st.host_flags;
  launch_ll_route(rp, stream);

  LlPackParams pk{};
  pk.l = l;
  pk.rank = ctx.topo.rank;
  pk.num_tokens = p.num_tokens;
  pk.fp8 = p.fp8;
  pk.round_scale = p.round_scale;
  pk.ue8m0 = p.ue8m0;
  pk.x = p.x;
  pk.x_row_stride = p.x_row_stride;
  pk.idx = idx;
  pk.words = words;
  pk.areas = a;
  pk.dst_mask = p.handle.dst_mask;
  launch_ll_pack(pk, stream);

  exchange(ctx, a, 0, l.dispatch_pair, stream);
}

void ll_dispatch_recv(LlContext& ctx, const kernels::LlDispatchParams& p, cudaStream_t stream) {
  const LlLayout l = ll_layout_of(p.g, p.fp8, p.ue8m0);
  LlUnpackParams up{};
  up.l = l;
  up.rank = ctx.topo.rank;
  up.recv = areas_of(ctx, p.parity).recv;
  up.out = p.out;
  up.tok_slots = p.handle.tok_slots;
  up.src_tokens = p.handle.src_tokens;
  up.mismatch = ctx.mismatch_dev;
  launch_ll_unpack(up, ctx.grid, stream);
  mark_used(ctx, p.parity, stream);
}

void ll_combine_send(LlContext& ctx, const kernels::LlCombineParams& p, cudaStream_t stream) {
  const LlLayout l = ll_layout_of(p.g, false, false);
  EL_CHECK(l.combine_bytes() <= ll_staging_area_bytes(ctx), "internal: LL combine of %lld bytes, area %lld",
           static_cast<long long>(l.combine_bytes()), static_cast<long long>(ll_staging_area_bytes(ctx)));
  const int area = 2 + p.parity;
  order_after_last_use(ctx, area, stream);
  const LlAreas a = areas_of(ctx, area);

  LlWeightsParams wp{};
  wp.l = l;
  wp.rank = ctx.topo.rank;
  wp.num_tokens = p.num_tokens;
  wp.idx = index_of(p.topk_idx, p.idx_type, p.idx_row_stride, p.idx_col_stride);
  wp.weights = p.topk_weights;
  wp.w_rs = p.w_row_stride;
  wp.w_cs = p.w_col_stride;
  wp.dst_mask = p.handle.dst_mask;
  wp.areas = a;
  launch_ll_weights(wp, stream);
  exchange(ctx, a, 0, l.weight_pair, stream);

  LlHolderParams hp{};
  hp.l = l;
  hp.rank = ctx.topo.rank;
  hp.x = static_cast<const char*>(p.x);
  hp.x_stride0 = p.x_stride0;
  hp.x_stride1 = p.x_stride1;
  hp.tok_slots = p.handle.tok_slots;
  hp.src_tokens = p.handle.src_tokens;
  hp.areas = a;
  launch_ll_holder(hp, ctx.grid, stream);
  exchange(ctx, a, l.partial_offset, l.partial_pair, stream);
}

void ll_combine_recv(LlContext& ctx, const kernels::LlCombineParams& p, cudaStream_t stream) {
  const LlLayout l = ll_layout_of(p.g, false, false);
  const int area = 2 + p.parity;
  LlSumParams sp{};
  sp.l = l;
  sp.rank = ctx.topo.rank;
  sp.num_tokens = p.num_tokens;
  sp.dst_mask = p.handle.dst_mask;
  sp.recv = areas_of(ctx, area).recv;
  sp.out = p.out;
  sp.out_row_stride = p.out_row_stride;
  launch_ll_sum(sp, ctx.grid, stream);
  mark_used(ctx, area, stream);
}

}  // namespace expertlink::internode
