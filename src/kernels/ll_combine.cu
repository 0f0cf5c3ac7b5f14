// LL combine: one kernel on all SMs, send half and/or receive half (split mode launches them apart).
// Each expert holder sums a token's weighted expert outputs of its own experts first, so one BF16 row
// per (token, rank) crosses NVLink, once; the source adds the partial rows. The weights travel as tagged
// words while the holder loads the expert outputs. Protocol: ll_protocol.cuh; budget: docs/ll_performance.md.
//
// Work assignment (warp index gw = warp * G + block, so consecutive units land on different SMs):
// holder units (source s, token t, segment q) from gw = 0 up; the weights of this rank's tokens and the
// receive units (token, segment) from the top warp down, so that in the fused kernel the two roles mostly
// fall on different warps.
#include <cuda_bf16.h>

#include "check.hpp"
#include "kernels/ll_numerics.cuh"
#include "kernels/ll_protocol.cuh"

namespace expertlink::kernels {
namespace {

// Expert-output rows (or partial rows) a warp holds in registers at once. A holder's first batch is in
// flight while the weights are awaited, and its other picks' rows are prefetched into L2 meanwhile.
constexpr int kBatch = 2;

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// What a warp carries across its send units: whether it has seen every peer free this parity's combine
// area, and the partial flags it still has to publish (lane i holds the i-th), one fence for all of them.
struct WarpSendState {
  bool free_checked = false;
  int pending = 0;
  uint64_t* flag = nullptr;
};

// Warp: every peer has finished reading its combine area of this parity (use n - 1); checked once.
__device__ __forceinline__ bool warp_wait_free(const LlCombineParams& p, uint64_t n, WarpSendState& ws) {
  if (ws.free_checked) return true;
  ws.free_checked = true;
  bool ok = true;
  for (int d = threadIdx.x & 31; d < p.g.num_ranks; d += 32)
    ok = ok && (!rank_live(p.win, d) ||
                ll_wait_free(p.win, control::ll::kCombineFree, p.parity, n, WaitSite::kLlCombineFree, d));
  __syncwarp();  // the acquires before any lane's stores into the peers
  return __all_sync(~0u, ok);
}

// One fence for every partial row this warp wrote, then each pending lane stores its flag. The warp barrier
// orders every lane's row stores before the fence, which is cumulative over them, so fence + plain store is
// a release of all the warp's rows (a lane's fence before the barrier covers only its own stores). A
// release store puts a second system fence in front of each flag: LL combine 26.3 us with it, 23.7 with
// one fence (2x H200, 2026-11-28).
__device__ __forceinline__ void flush_flags(WarpSendState& ws, uint64_t n) {
  if (ws.pending == 0) return;
  __syncwarp();
  __threadfence_system();
  if (static_cast<int>(threadIdx.x & 31) < ws.pending) ll_st_relaxed_sys(ws.flag, n);
  ws.pending = 0;
}

// Warp: (weight, valid) of this rank's token t, pick k (lane k), as tagged words into every rank holding
// one of t's experts.
__device__ bool push_weights(const LlCombineParams& p, uint64_t n, int t, WarpSendState& ws) {
  const LlGeometry& g = p.g;
  const int lane = threadIdx.x & 31, K = g.topk;
  const uint64_t mask = p.handle.dst_mask[t] & ~p.win.masked;
  int64_t e = -1;
  float wt = 0.f;
  if (lane < K) {
    e = load_index(p.topk_idx, p.idx_type, t * p.idx_row_stride + lane * p.idx_col_stride);
    wt = p.topk_weights[t * p.w_row_stride + lane * p.w_col_stride];
  }
  // Lane d's (and d + 32's) window, read with the other loads rather than after the "free" acquire.
  char* const base_lo = lane < g.num_ranks ? p.win.peer_base[lane] : nullptr;
  char* const base_hi = lane + 32 < g.num_ranks ? p.win.peer_base[lane + 32] : nullptr;
  if (!warp_wait_free(p, n, ws)) return false;
  const uint64_t word = ll_tagged((static_cast<uint32_t>(n) << 1) | (e >= 0 ? 1u : 0u), __float_as_uint(wt));
  for (uint64_t m = mask; m != 0; m &= m - 1) {  // warp-uniform
    const int d = __ffsll(static_cast<long long>(m)) - 1;
    char* const base = reinterpret_cast<char*>(
        __shfl_sync(~0u, reinterpret_cast<uintptr_t>(d < 32 ? base_lo : base_hi), d & 31));
    if (lane < K) ll_st_relaxed_sys(ll_wword(ll_area(base, g, 2 + p.parity), g, p.win.rank, t, lane), word);
  }
  return true;
}

// Warp: segment q of the weighted sum of source s's token t over its picks here (pick order), rounded
// once to BF16, into s's area; its flag joins the warp's pending flags.
__device__ bool holder_unit(const LlCombineParams& p, uint64_t n, int s, int t, int q, WarpSendState& ws) {
  const SymmetricView& w = p.win;
  const LlGeometry& g = p.g;
  const int lane = threadIdx.x & 31, K = g.topk, N = g.capacity, RN = g.num_ranks * N;
  // Loads first (in flight together): s's token count, t's slots here (dispatch handle), s's window (read
  // here: after the "free" acquire below it would cost a round trip of its own before the stores).
  const int Ts = rank_live(w, s) ? p.handle.src_tokens[s] : 0;  // a masked source gets nothing
  char* const s_base = w.peer_base[s];
  const int32_t slot = lane < K ? p.handle.tok_slots[(static_cast<int64_t>(s) * N + t) * K + lane] : -1;
  if (t >= Ts) return true;  // warp-uniform
  const uint32_t cmask = __ballot_sync(~0u, slot >= 0);
  if (cmask == 0) return true;  // no expert of t here: s expects nothing from us
  const int j = slot >= 0 ? slot / RN : 0;
  const int64_t off = j * p.x_stride0 + static_cast<int64_t>(slot >= 0 ? slot - j * RN : 0) * p.x_stride1;
  const int64_t vecs = g.hidden / 8;
  const int64_t first = static_cast<int64_t>(q) * kLlSegmentVecs + lane;
  const char* x = static_cast<const char*>(p.x);

  float acc[kLlUnroll][8] = {};
  uint32_t todo = cmask, use = 0;
  float wt = 0.f;
  bool waited = false;
  while (todo != 0) {  // warp-uniform
    int kb[kBatch];
    int4 v[kBatch][kLlUnroll];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      kb[b] = -1;
      if (todo != 0) {
        kb[b] = __ffs(todo) - 1;
        todo &= todo - 1;
        const int64_t o = __shfl_sync(~0u, off, kb[b]);
#pragma unroll
        for (int i = 0; i < kLlUnroll; ++i)
          v[b][i] = first + 32 * i < vecs ? ld_nc_v4(x + o + (first + 32 * i) * 16) : make_int4(0, 0, 0, 0);
      }
    }
    if (!waited) {  // the first batch is in flight: prefetch the other picks, then wait for the weights
      waited = true;
      for (uint32_t rest = todo; rest != 0; rest &= rest - 1) {
        const int64_t o = __shfl_sync(~0u, off, __ffs(rest) - 1);
#pragma unroll
        for (int i = 0; i < kLlUnroll; ++i)
          if (first + 32 * i < vecs) prefetch_l2(x + o + (first + 32 * i) * 16);
      }
      uint64_t word = 0;
      bool ok = true;
      if ((cmask >> lane) & 1)
        ok = ll_wait_tag(ll_wword(ll_area(w.local_base, g, 2 + p.parity), g, s, t, lane),
                         static_cast<uint32_t>(n) << 1, ~1u, WaitContext{w.record, w.timeout_ns, w.rank},
                         WaitSite::kLlCombineWeights, s, p.parity, word);
      if (!__all_sync(~0u, ok)) return false;
      ll_stamp(p.trace, kCombSendWeightsIn);
      wt = __uint_as_float(static_cast<uint32_t>(word));
      use = __ballot_sync(~0u, ((cmask >> lane) & 1) && ((word >> 32) & 1));
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (kb[b] < 0) continue;
      const float wk = __shfl_sync(~0u, wt, kb[b]);
      if (((use >> kb[b]) & 1) == 0) continue;  // masked at combine time
#pragma unroll
      for (int i = 0; i < kLlUnroll; ++i)
        if (first + 32 * i < vecs) add_weighted(acc[i], v[b][i], wk);
    }
  }
  if (!warp_wait_free(p, n, ws)) return false;
  char* area = ll_area(s_base, g, 2 + p.parity);
  int4* dst = reinterpret_cast<int4*>(area + g.partial_offset +
                                      (static_cast<int64_t>(w.rank) * N + t) * g.partial_bytes);
#pragma unroll
  for (int i = 0; i < kLlUnroll; ++i)
    if (first + 32 * i < vecs) dst[first + 32 * i] = to_bf16x8(acc[i]);
  if (lane == ws.pending) ws.flag = ll_pflag(area, g, w.rank, t, q);
  if (++ws.pending == 32) flush_flags(ws, n);
  return true;
}

// Send half for one warp: weights out, then its holder units.
__device__ bool combine_send(const LlCombineParams& p, uint64_t n, int64_t gw, int64_t GW) {
  const LlGeometry& g = p.g;
  WarpSendState ws;
  for (int64_t t = GW - 1 - gw; t < p.num_tokens; t += GW)
    if (!push_weights(p, n, static_cast<int>(t), ws)) return false;
  ll_stamp(p.trace, kCombSendWeights);
  const int nseg = static_cast<int>((g.hidden / 8 + kLlSegmentVecs - 1) / kLlSegmentVecs);
  const int64_t per_source = static_cast<int64_t>(g.capacity) * nseg;
  const int64_t units = g.num_ranks * per_source;
  for (int64_t u = gw; u < units; u += GW) {
    const int s = static_cast<int>(u / per_source);
    const int64_t r = u - s * per_source;
    const int t = static_cast<int>(r / nseg), q = static_cast<int>(r - static_cast<int64_t>(t) * nseg);
    if (!holder_unit(p, n, s, t, q, ws)) return false;
  }
  ll_stamp(p.trace, kCombSendUnits);
  flush_flags(ws, n);
  ll_stamp(p.trace, kCombSendFlushed);
  return true;
}

// Receive half for one warp: out[t] segment q = sum of the partial rows of the ranks t went to, in rank
// order, each awaited by its own flag.
__device__ bool combine_recv(const LlCombineParams& p, uint64_t n, int64_t gw, int64_t GW) {
  const SymmetricView& w = p.win;
  const LlGeometry& g = p.g;
  const int lane = threadIdx.x & 31, R = g.num_ranks, N = g.capacity;
  const WaitContext ctx{w.record, w.timeout_ns, w.rank};
  char* area = ll_area(w.local_base, g, 2 + p.parity);
  const int64_t vecs = g.hidden / 8;
  const int nseg = static_cast<int>((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  const int64_t units = static_cast<int64_t>(p.num_tokens) * nseg;
  for (int64_t u = GW - 1 - gw; u < units; u += GW) {
    const int t = static_cast<int>(u / nseg), q = static_cast<int>(u - static_cast<int64_t>(t) * nseg);
    const uint64_t mask = p.handle.dst_mask[t] & ~w.masked;  // masked holders contribute nothing
    bool ok = true;
    for (int d = lane; d < R; d += 32)
      if ((mask >> d) & 1)
        ok = ok && wait_geq(ll_pflag(area, g, d, t, q), n, ctx, WaitSite::kLlCombineData, d, p.parity);
    __syncwarp();
    if (!__all_sync(~0u, ok)) return false;
    ll_stamp(p.trace, kCombRecvFlag);
    const int64_t first = static_cast<int64_t>(q) * kLlSegmentVecs + lane;
    float acc[kLlUnroll][8] = {};
    uint64_t todo = mask;
    while (todo != 0) {  // kBatch ranks' rows in flight at once, added in rank order
      int4 v[kBatch][kLlUnroll];
      int nb = 0;
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (todo == 0) break;
        const int d = __ffsll(static_cast<long long>(todo)) - 1;
        todo &= todo - 1;
        ++nb;
        const int4* src = reinterpret_cast<const int4*>(area + g.partial_offset +
                                                        (static_cast<int64_t>(d) * N + t) * g.partial_bytes);
#pragma unroll
        for (int i = 0; i < kLlUnroll; ++i)
          v[b][i] = first + 32 * i < vecs ? __ldcg(src + first + 32 * i) : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (b < nb)
#pragma unroll
          for (int i = 0; i < kLlUnroll; ++i)
            if (first + 32 * i < vecs) add_bf16x8(acc[i], v[b][i]);
    }
    int4* out =
        reinterpret_cast<int4*>(static_cast<char*>(p.out) + static_cast<int64_t>(t) * p.out_row_stride * 2);
#pragma unroll
    for (int i = 0; i < kLlUnroll; ++i)
      if (first + 32 * i < vecs) out[first + 32 * i] = to_bf16x8(acc[i]);
  }
  ll_stamp(p.trace, kCombRecvSummed);
  return true;
}

__global__ void __launch_bounds__(kLlThreads, 1)
    ll_combine_kernel(const __grid_constant__ LlCombineParams p) {
  __shared__ int failed;
  const bool send = (p.phases & kLlSend) != 0, recv = (p.phases & kLlRecv) != 0;
  const uint64_t n_send = ll_use(p.st, kLlSeqCombineSend + p.parity);
  const uint64_t n_recv = ll_use(p.st, kLlSeqCombineRecv + p.parity);
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  const int64_t gw = static_cast<int64_t>(threadIdx.x / 32) * gridDim.x + blockIdx.x;
  const int64_t GW = static_cast<int64_t>(gridDim.x) * kLlWarps;
  bool ok = true;
  if (send) ll_stamp(p.trace, kCombSendBegin);
  if (send) ok = combine_send(p, n_send, gw, GW);
  if (ok && recv) ll_stamp(p.trace, kCombRecvBegin);
  if (ok && recv) ok = combine_recv(p, n_recv, gw, GW);
  if (!ok && (threadIdx.x & 31) == 0) failed = 1;
  __syncthreads();
  if (failed) return;
  // Every block has read this use's area and its use counts: free the area, advance the counts.
  if (ll_block_done(&p.st.done[(recv ? kLlDoneCombineRecv : kLlDoneCombineSend) + p.parity])) {
    if (recv && threadIdx.x < p.g.num_ranks && rank_live(p.win, threadIdx.x))
      st_release_sys(ll_signal(p.win.peer_base[threadIdx.x], control::ll::kCombineFree, p.parity, p.win.rank),
                     n_recv);
    if (threadIdx.x == 0) {
      if (send) p.st.seq[kLlSeqCombineSend + p.parity] = n_send;
      if (recv) p.st.seq[kLlSeqCombineRecv + p.parity] = n_recv;
    }
  }
  ll_stamp(p.trace, kCombEnd);
}

}  // namespace

int ll_combine_blocks_per_sm() {
  return ll_blocks_per_sm(ll_combine_kernel);
}

void launch_ll_combine(const LlCombineParams& p, int grid, cudaStream_t stream) {
  LlCombineParams q = p;
  q.trace = ll_trace_arm(LlTraceKind::kCombine, grid, p.phases, stream);
  ll_launch_cooperative(ll_combine_kernel, q, grid, stream);
}

}  // namespace expertlink::kernels
