// Host side of the internode HT path: notify (count exchange, plan, per-node lists, mask exchange),
// dispatch (pack -> network hop -> forward -> NVLink hop -> unpack) and combine (the reverse, reducing at
// the forwarder before the network hop and at the source after it). Message sizes on both sides come from
// the same all-gathered counts, so every ncclSend has its matching ncclRecv of the same size.
#include "internode/internode.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "buffer_state.hpp"
#include "check.hpp"
#include "comm/host_wait.hpp"
#include "ht/handle.hpp"
#include "internode/internode_kernels.hpp"
#include "internode/plan.hpp"
#include "internode/transport.hpp"

namespace expertlink::internode {
namespace {

// Grow-only device allocation. Growing frees the old memory (cudaFree synchronizes the device, so no
// earlier call still uses it).
struct DeviceBytes {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBytes() = default;
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  ~DeviceBytes() { cudaFree(ptr); }
  void reserve(size_t n) {
    n = std::max<size_t>(n, 16);
    if (n <= bytes) return;
    cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
    EL_CUDA_CHECK(cudaMalloc(&ptr, n));
    bytes = n;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

Offsets offsets(const std::vector<int64_t>& v) {
  EL_CHECK(v.size() <= size_t(kMaxTargets + 1), "internal: %zu offsets", v.size());
  Offsets o{};
  std::copy(v.begin(), v.end(), o.v);
  return o;
}

Offsets offsets(const std::vector<int32_t>& v) {
  return offsets(std::vector<int64_t>(v.begin(), v.end()));
}

}  // namespace

// Staging buffers, by stage and role (records of the call's layout; combine uses them in reverse):
//   kSend1 source's per-node records      kRecv1 forwarder's records from each source node
//   kSend2 forwarder's per-local records  kRecv2 receiver's records from each forwarder
enum Stage { kSend1, kRecv1, kSend2, kRecv2, kStages };

struct Context {
  Topology topo;
  RuntimeOptions options;
  ncclComm_t comm = nullptr;
  std::unique_ptr<Transport> transport;
  DeviceBytes stage[kStages];
  DeviceBytes counts, gathered, errors, barrier_word;
  std::vector<int32_t> gathered_host, errors_host, header;
  WaitRecord record{};  // no device waits on this path: stays clear; lets host waits share wait_for_stream
};

struct HandleExtra {
  Plan plan;
  int64_t record_bytes = 0;  // staging bytes reserved per record
  std::vector<int32_t> host_rank_prefix, host_expert_count;
  DeviceBytes list1, pos1, masks_send, masks_recv, list2, pos2;
};

std::shared_ptr<Context> make_context(const Communicator& comm, const Topology& topo,
                                      RuntimeOptions options) {
  EL_CHECK(topo.num_ranks <= kHtMaxRanks && topo.num_nodes <= kMaxTargets && topo.local_size <= kMaxTargets,
           "internode: %d ranks on %d nodes exceed the limits (%d ranks)", topo.num_ranks, topo.num_nodes,
           kHtMaxRanks);
  auto ctx = std::make_shared<Context>();
  ctx->topo = topo;
  ctx->options = options;
  ctx->comm = comm.nccl();
  ctx->transport = make_gin_transport(comm.nccl());
  if (!ctx->transport) ctx->transport = make_nccl_p2p_transport(comm.nccl());
  ctx->errors.reserve(sizeof(int32_t) * kErrorWords);
  ctx->barrier_word.reserve(sizeof(int32_t));
  return ctx;
}

size_t staging_bytes(const Context& ctx) {
  size_t n = 0;
  for (const DeviceBytes& b : ctx.stage) n += b.bytes;
  return n;
}

const char* transport_name(const Context& ctx) {
  return ctx.transport->name();
}

void synchronize(Context& ctx, cudaStream_t stream) {
  wait_for_stream(stream, ctx.options.timeout_s, &ctx.record, ctx.topo.rank);
}

void barrier(Context& ctx, cudaStream_t stream) {
  EL_NCCL_CHECK(
      ncclAllReduce(ctx.barrier_word.ptr, ctx.barrier_word.ptr, 1, ncclInt32, ncclSum, ctx.comm, stream));
}

namespace {

// Messages of one hop. Stage 1 (network): this rank <-> rank (n, local_rank) of every node n, blocks of
// `count[n]` records at `off[n]`. Stage 2 (NVLink): this rank <-> rank (node, j) of its own node.
void add_messages(std::vector<Message>& out, const Topology& topo, bool network,
                  const std::vector<int64_t>& off, char* base, int64_t record_bytes) {
  const int targets = network ? topo.num_nodes : topo.local_size;
  for (int k = 0; k < targets; ++k) {
    const int64_t count = off[k + 1] - off[k];
    if (count == 0) continue;  // the peer computed the same zero from the same counts
    const int peer = network ? topo.rank_of(k, topo.local_rank) : topo.rank_of(topo.node, k);
    out.push_back({peer, base + off[k] * record_bytes, static_cast<size_t>(count * record_bytes)});
  }
}

void hop(Context& ctx, bool network, const std::vector<int64_t>& send_off, char* send_base,
         const std::vector<int64_t>& recv_off, char* recv_base, int64_t record_bytes, cudaStream_t stream) {
  std::vector<Message> sends, recvs;
  add_messages(sends, ctx.topo, network, send_off, send_base, record_bytes);
  add_messages(recvs, ctx.topo, network, recv_off, recv_base, record_bytes);
  ctx.transport->exchange(sends, recvs, stream);
}

void raise_errors(Context& ctx, const char* what) {
  const std::vector<int32_t>& e = ctx.errors_host;
  if (e[kListMismatch] != 0)
    EL_FAIL(ErrorCode::kInternal,
            "rank %d: internode %s: list %d holds %d entries but the exchanged counts planned %d (the ranks' "
            "routing and counts disagree)",
            ctx.topo.rank, what, e[kListMismatch + 1], e[kListMismatch + 2], e[kListMismatch + 3]);
}

}  // namespace

void ht_notify(Buffer::State& s, const HtDispatchArgs& args, std::unique_ptr<HtHandleState>& handle,
               Sizing sizing, int64_t capacity, cudaStream_t stream) {
  Context& ctx = *s.internode;
  const Topology& topo = ctx.topo;
  const int R = topo.num_ranks, N = topo.num_nodes, L = topo.local_size;
  const int T = static_cast<int>(args.x.shape[0]);
  const bool has_topk = args.topk_idx.defined();
  const int topk = has_topk ? static_cast<int>(args.topk_idx.shape[1]) : 0;

  if (!handle) handle = std::make_unique<HtHandleState>();
  HtHandleState& h = *handle;
  const int local_experts = has_topk ? args.num_experts / R : 0;
  h.reserve(T, R, local_experts);
  h.owner = &s;
  h.num_ranks = R;
  h.num_tokens = T;
  h.topk = topk;
  h.num_experts = has_topk ? args.num_experts : 0;
  h.hidden = static_cast<int>(args.x.shape[1]);
  h.exact = sizing == Sizing::kExact;
  if (!h.internode) h.internode = std::make_shared<HandleExtra>();
  HandleExtra& x = *h.internode;

  // 1. Count this rank's tokens per destination rank, node and expert; all-gather the blocks.
  CountLayout layout;
  layout.num_ranks = R;
  layout.num_nodes = N;
  layout.max_experts = kHtMaxExperts;
  const int ints = layout.ints();
  ctx.counts.reserve(sizeof(int32_t) * ints);
  ctx.gathered.reserve(sizeof(int32_t) * ints * R);
  ctx.header = {T, h.hidden, topk, h.num_experts};
  EL_CUDA_CHECK(cudaMemsetAsync(ctx.counts.ptr, 0, sizeof(int32_t) * ints, stream));
  EL_CUDA_CHECK(cudaMemsetAsync(ctx.errors.ptr, 0, sizeof(int32_t) * kErrorWords, stream));
  EL_CUDA_CHECK(cudaMemcpyAsync(ctx.counts.ptr, ctx.header.data(), sizeof(int32_t) * CountLayout::kHeader,
                                cudaMemcpyHostToDevice, stream));
  CountParams cp{};
  cp.topk_idx = has_topk ? args.topk_idx.data : nullptr;
  cp.idx_type = !has_topk
                    ? kernels::IdxType::kNone
                    : (args.topk_idx.dtype == DType::kI64 ? kernels::IdxType::kI64 : kernels::IdxType::kI32);
  cp.idx_rs = has_topk ? args.topk_idx.stride[0] : 0;
  cp.idx_cs = has_topk ? args.topk_idx.stride[1] : 0;
  cp.in_rank = has_topk ? nullptr : args.is_token_in_rank.ptr<uint8_t>();
  cp.in_rank_rs = has_topk ? 0 : args.is_token_in_rank.stride[0];
  cp.num_tokens = T;
  cp.topk = topk;
  cp.num_experts = h.num_experts;
  cp.num_ranks = R;
  cp.num_nodes = N;
  cp.local_size = L;
  cp.masks = h.token_mask;
  cp.counts = ctx.counts.as<int32_t>();
  cp.per_rank_at = layout.per_rank();
  cp.per_node_at = layout.per_node();
  cp.per_expert_at = layout.per_expert();
  cp.errors = ctx.errors.as<int32_t>();
  launch_count(cp, stream);
  EL_NCCL_CHECK(ncclAllGather(ctx.counts.ptr, ctx.gathered.ptr, ints, ncclInt32, ctx.comm, stream));
  ctx.gathered_host.resize(size_t(ints) * R);
  ctx.errors_host.resize(kErrorWords);
  EL_CUDA_CHECK(cudaMemcpyAsync(ctx.gathered_host.data(), ctx.gathered.ptr, sizeof(int32_t) * ints * R,
                                cudaMemcpyDeviceToHost, stream));
  EL_CUDA_CHECK(cudaMemcpyAsync(ctx.errors_host.data(), ctx.errors.ptr, sizeof(int32_t) * kErrorWords,
                                cudaMemcpyDeviceToHost, stream));
  synchronize(ctx, stream);
  // A bad expert id is ignored (as intranode) and reported at the end, once every rank is past the
  // collective steps of this notify.
  const std::vector<int32_t> bad(ctx.errors_host.begin() + kBadExpert,
                                 ctx.errors_host.begin() + kBadExpert + 4);

  // 2. The plan (every rank derives it from the same gathered counts; a disagreement raises everywhere).
  x.plan = make_plan(topo, layout, ctx.gathered_host);
  const Plan& p = x.plan;
  x.record_bytes = max_record_bytes(h.hidden, topk);
  const int64_t rec = x.record_bytes;
  ctx.stage[kSend1].reserve(size_t(p.send1_total() * rec));
  ctx.stage[kRecv1].reserve(size_t(p.recv1_total() * rec));
  ctx.stage[kSend2].reserve(size_t(p.send2_total() * rec));
  ctx.stage[kRecv2].reserve(size_t(p.num_recv() * rec));
  x.list1.reserve(sizeof(int32_t) * p.send1_total());
  x.pos1.reserve(sizeof(int32_t) * size_t(T) * N);
  x.masks_send.reserve(sizeof(uint64_t) * p.send1_total());
  x.masks_recv.reserve(sizeof(uint64_t) * p.recv1_total());
  x.list2.reserve(sizeof(int32_t) * p.send2_total());
  x.pos2.reserve(sizeof(int32_t) * size_t(p.recv1_total()) * L);

  // 3. Per-node lists of this rank's tokens; the destination masks travel the network hop so that each
  //    forwarder can list, per local rank, the records it will forward.
  launch_lists(h.token_mask, T, N, 0, L, L, offsets(p.send1_off), x.list1.as<int32_t>(), x.pos1.as<int32_t>(),
               ctx.errors.as<int32_t>(), stream);
  launch_gather_masks(h.token_mask, x.list1.as<int32_t>(), p.send1_total(), x.masks_send.as<uint64_t>(),
                      stream);
  hop(ctx, /*network=*/true, p.send1_off, x.masks_send.as<char>(), p.recv1_off, x.masks_recv.as<char>(),
      sizeof(uint64_t), stream);
  launch_lists(x.masks_recv.as<uint64_t>(), p.recv1_total(), L, topo.node * L, 1, 1, offsets(p.send2_off),
               x.list2.as<int32_t>(), x.pos2.as<int32_t>(), ctx.errors.as<int32_t>(), stream);

  // 4. The handle's receiving side.
  const int64_t num_recv = p.num_recv();
  h.num_recv = num_recv;
  h.capacity = h.exact ? num_recv : capacity;
  h.reserve_recv(h.exact ? num_recv : capacity);
  x.host_rank_prefix = p.rank_prefix;
  EL_CUDA_CHECK(cudaMemcpyAsync(h.rank_prefix, x.host_rank_prefix.data(), sizeof(int32_t) * (R + 1),
                                cudaMemcpyHostToDevice, stream));
  volatile int32_t* hc = h.host_counts;
  hc[kernels::kHostTotal] = static_cast<int32_t>(num_recv);
  hc[kernels::kHostOverCapacity] = num_recv > h.capacity ? 1 : 0;
  hc[kernels::kHostBadExpert] = bad[0];
  hc[3] = bad[1];
  hc[4] = bad[2];
  hc[5] = bad[3];
  if (local_experts > 0) {
    x.host_expert_count.resize(local_experts);
    const int align = args.expert_alignment;
    for (int j = 0; j < local_experts; ++j) {
      x.host_expert_count[j] = (p.expert_count[j] + align - 1) / align * align;
      hc[kernels::kHostHeader + j] = x.host_expert_count[j];
    }
    EL_CUDA_CHECK(cudaMemcpyAsync(h.expert_count, x.host_expert_count.data(), sizeof(int32_t) * local_experts,
                                  cudaMemcpyHostToDevice, stream));
  }
  EL_CUDA_CHECK(cudaMemcpyAsync(ctx.errors_host.data(), ctx.errors.ptr, sizeof(int32_t) * kErrorWords,
                                cudaMemcpyDeviceToHost, stream));
  synchronize(ctx, stream);
  raise_errors(ctx, "notify");
  if (h.exact) h.raise_flags();
}

void ht_dispatch(Buffer::State& s, const HtDispatchArgs& args, HtHandleState& h, const HtDispatchOutputs& out,
                 cudaStream_t stream) {
  Context& ctx = *s.internode;
  EL_CHECK(h.internode != nullptr, "handle was not filled by an internode ht_notify");
  const HandleExtra& x = *h.internode;
  const Plan& p = x.plan;
  const Topology& topo = ctx.topo;
  const int64_t H = args.x.shape[1];
  const bool fp8 = args.x.dtype == DType::kFP8E4M3;
  const int scale_cols =
      !fp8 ? 0 : (args.x_scales.dtype == DType::kF32 ? int(H / 128) : int((H + 511) / 512));
  // The layout depends only on what every rank shares (dtype, H, the handle's top-k): ids and weights
  // slots are always there when the handle has top-k, so every rank's messages have the planned sizes.
  const RecordLayout rl = make_record_layout(H * dtype_size(args.x.dtype), scale_cols, h.topk, h.topk > 0);
  EL_CHECK(rl.bytes <= x.record_bytes, "internal: dispatch record of %lld bytes, staging planned %lld",
           static_cast<long long>(rl.bytes), static_cast<long long>(x.record_bytes));
  const bool has_idx = args.topk_idx.defined();

  char* send1 = ctx.stage[kSend1].as<char>();
  char* recv1 = ctx.stage[kRecv1].as<char>();
  char* send2 = ctx.stage[kSend2].as<char>();
  char* recv2 = ctx.stage[kRecv2].as<char>();

  PackParams pk{};
  pk.rec = rl;
  pk.list = x.list1.as<int32_t>();
  pk.n = p.send1_total();
  pk.x = {args.x.data, args.x.stride[0], 1};
  pk.elem_bytes = dtype_size(args.x.dtype);
  if (scale_cols > 0) pk.scales = {args.x_scales.data, args.x_scales.stride[0], args.x_scales.stride[1]};
  pk.topk_idx = has_idx ? args.topk_idx.data : nullptr;
  pk.idx_type = !has_idx
                    ? kernels::IdxType::kNone
                    : (args.topk_idx.dtype == DType::kI64 ? kernels::IdxType::kI64 : kernels::IdxType::kI32);
  pk.idx_rs = has_idx ? args.topk_idx.stride[0] : 0;
  pk.idx_cs = has_idx ? args.topk_idx.stride[1] : 0;
  if (args.topk_weights.defined())
    pk.weights = {args.topk_weights.data, args.topk_weights.stride[0], args.topk_weights.stride[1]};
  pk.out = send1;
  launch_pack(pk, stream);

  hop(ctx, /*network=*/true, p.send1_off, send1, p.recv1_off, recv1, rl.bytes, stream);
  launch_forward(recv1, x.list2.as<int32_t>(), p.send2_total(), rl.bytes, send2, stream);
  hop(ctx, /*network=*/false, p.send2_off, send2, p.recv2_off, recv2, rl.bytes, stream);

  UnpackParams up{};
  up.rec = rl;
  up.in = recv2;
  up.rank_prefix = offsets(p.rank_prefix);
  up.src_record = offsets(p.src_record);
  up.num_ranks = topo.num_ranks;
  up.rank = topo.rank;
  up.local_experts = h.num_experts > 0 ? h.num_experts / topo.num_ranks : 1;
  up.rows = std::min<int64_t>(p.num_recv(), h.capacity);
  up.recv_x = out.recv_x.data;
  up.recv_x_stride = out.recv_x.stride[0] * dtype_size(out.recv_x.dtype);
  if (scale_cols > 0) {
    up.recv_scales = out.recv_x_scales.data;
    up.scales_rs = out.recv_x_scales.stride[0];
    up.scales_cs = out.recv_x_scales.stride[1];
  }
  up.recv_topk_idx = out.recv_topk_idx.defined() ? out.recv_topk_idx.data : nullptr;
  up.idx_type = out.recv_topk_idx.defined() && out.recv_topk_idx.dtype == DType::kI32
                    ? kernels::IdxType::kI32
                    : kernels::IdxType::kI64;
  up.recv_weights = out.recv_topk_weights.defined() ? out.recv_topk_weights.ptr<float>() : nullptr;
  up.recv_src_token = h.recv_src_token;
  launch_unpack(up, stream);
  if (out.num_recv_tokens_per_expert.defined() && h.num_experts > 0)
    EL_CUDA_CHECK(cudaMemcpyAsync(out.num_recv_tokens_per_expert.data, h.expert_count,
                                  sizeof(int32_t) * (h.num_experts / topo.num_ranks),
                                  cudaMemcpyDeviceToDevice, stream));
}

void ht_combine(Buffer::State& s, const HtCombineArgs& args, const HtHandleState& h,
                const HtCombineOutputs& out, cudaStream_t stream) {
  Context& ctx = *s.internode;
  EL_CHECK(h.internode != nullptr, "handle was not filled by an internode ht_notify");
  const HandleExtra& x = *h.internode;
  const Plan& p = x.plan;
  const Topology& topo = ctx.topo;
  EL_CHECK(p.num_recv() <= h.capacity,
           "%lld rows arrived but the dispatch outputs held %lld (capacity): combine needs every row",
           static_cast<long long>(p.num_recv()), static_cast<long long>(h.capacity));
  const int64_t H = args.x.shape[1];
  EL_CHECK(H == h.hidden, "combine x has hidden = %lld but the handle was made with hidden = %d",
           static_cast<long long>(H), h.hidden);
  // As for dispatch, the record always has the weight slots when the handle has top-k.
  const int64_t crec = combine_record_bytes(H, h.topk);
  EL_CHECK(crec <= x.record_bytes, "internal: combine record of %lld bytes, staging planned %lld",
           static_cast<long long>(crec), static_cast<long long>(x.record_bytes));
  char* send1 = ctx.stage[kSend1].as<char>();
  char* recv1 = ctx.stage[kRecv1].as<char>();
  char* send2 = ctx.stage[kSend2].as<char>();
  char* recv2 = ctx.stage[kRecv2].as<char>();

  CombinePackParams cp{};
  cp.rank_prefix = offsets(p.rank_prefix);
  cp.src_record = offsets(p.src_record);
  cp.num_ranks = topo.num_ranks;
  cp.rows = p.num_recv();
  cp.hidden = H;
  cp.topk = args.topk_weights.defined() ? h.topk : 0;
  cp.x = {args.x.data, args.x.stride[0], 1};
  if (args.topk_weights.defined())
    cp.weights = {args.topk_weights.data, args.topk_weights.stride[0], args.topk_weights.stride[1]};
  cp.rec_bytes = crec;
  cp.out = recv2;
  launch_combine_pack(cp, stream);

  // NVLink hop back to the forwarders, which reduce over their node's ranks.
  hop(ctx, /*network=*/false, p.recv2_off, recv2, p.send2_off, send2, crec, stream);
  ReduceParams fr{};
  fr.in = send2;
  fr.in_rec_bytes = crec;
  fr.pos = x.pos2.as<int32_t>();
  fr.targets = topo.local_size;
  fr.off = offsets(p.send2_off);
  fr.n = p.recv1_total();
  fr.hidden = H;
  fr.topk = cp.topk;
  fr.out = recv1;
  fr.out_stride = crec;
  fr.weights_to_record = true;
  launch_reduce(fr, stream);

  // Network hop back to the sources, which reduce over nodes and add the biases.
  hop(ctx, /*network=*/true, p.recv1_off, recv1, p.send1_off, send1, crec, stream);
  ReduceParams sr{};
  sr.in = send1;
  sr.in_rec_bytes = crec;
  sr.pos = x.pos1.as<int32_t>();
  sr.targets = topo.num_nodes;
  sr.off = offsets(p.send1_off);
  sr.n = h.num_tokens;
  sr.hidden = H;
  sr.topk = out.combined_topk_weights.defined() ? cp.topk : 0;
  if (args.bias0.defined()) sr.bias0 = {args.bias0.data, args.bias0.stride[0], 1};
  if (args.bias1.defined()) sr.bias1 = {args.bias1.data, args.bias1.stride[0], 1};
  sr.out = static_cast<char*>(out.combined_x.data);
  sr.out_stride = out.combined_x.stride[0] * 2;
  sr.out_weights = out.combined_topk_weights.defined() ? out.combined_topk_weights.ptr<float>() : nullptr;
  sr.weights_to_record = false;
  launch_reduce(sr, stream);
}

}  // namespace expertlink::internode
