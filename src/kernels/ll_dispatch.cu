// LL dispatch: one kernel on all SMs, send half and/or receive half (split mode launches them apart).
// Every token row is read and cast to FP8 once, and written once into each rank that holds one of its
// experts; the receiver expands it to its experts' rows as soon as it lands. Protocol and buffer layout:
// ll_protocol.cuh; time budget: docs/ll_performance.md.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "check.hpp"
#include "kernels/ll_expand.cuh"
#include "kernels/ll_numerics.cuh"
#include "kernels/ll_protocol.cuh"

namespace expertlink::kernels {
namespace {

// BF16 input vectors a thread holds per token: H / 8 <= kLlMaxHidden / 8 = kXVecs * kLlThreads. For FP8 a
// thread holds the 2 vectors (16 channels) of one chunk per pair.
constexpr int kXVecs = kLlMaxHidden / 8 / kLlThreads;
static_assert(kXVecs * 8 * kLlThreads == kLlMaxHidden && kXVecs % 2 == 0, "the x prefetch covers a row");
// Picks counting: a half-warp takes one token, a lane per pick (K <= 16 = half a warp), and has this many
// tokens' picks in flight at once.
constexpr int kPickUnroll = 4;
constexpr int kPickHalves = kLlThreads / 16;  // tokens per block and step
static_assert(kLlMaxTopk <= 16, "a token's picks fit half a warp");

struct SendShared {
  int hist[kLlMaxExperts];     // picks per expert of the tokens before the one being sent
  int32_t expert[kLlMaxTopk];  // the token being sent: valid expert id or -1
  int32_t word[kLlMaxTopk];    // its header words: j | pos << 10 | dup << 30, or -1
  uint64_t mask;               // its destination ranks
  char* window[kMaxRanks];     // peer_base, read once: from global memory it was a load before every store
};

struct RecvShared {
  int begin[kLlMaxExperts];   // [j * R + s]: first row of source s in expert j
  int tokens[kMaxRanks + 1];  // prefix over sources of T_s
};

__device__ __forceinline__ int64_t pick(const LlDispatchParams& p, int t, int k) {
  return load_index(p.topk_idx, p.idx_type, t * p.idx_row_stride + k * p.idx_col_stride);
}

// The picks of one step of tokens: lane k of half-warp h holds pick k of token h + step + j * kPickHalves.
struct PickStep {
  int64_t v[kPickUnroll];
};

__device__ __forceinline__ void load_pick_step(const LlDispatchParams& p, int t_end, int step, PickStep& s) {
  const int k = threadIdx.x & 15, h = static_cast<int>(threadIdx.x >> 4);
#pragma unroll
  for (int j = 0; j < kPickUnroll; ++j) {
    const int t = h + step + j * kPickHalves;
    s.v[j] = t < t_end && k < p.g.topk ? pick(p, t, k) : -1;
  }
}

// Adds the distinct valid experts of tokens [0, t_end) to hist (a token counts an expert once; invalid ids
// are left to token_header to report, a masked rank's picks count as -1). `first` holds step 0's picks,
// loaded by the caller before its barrier. The work is T * K lanes, issued once: each thread walking
// every (token, pick) slot it might own, fully unrolled and mostly predicated off, made the count
// issue-bound (~2,600 instructions per warp, 16 warps per block: the trace's 5.4 us load phase).
__device__ void count_picks(const LlDispatchParams& p, int t_end, const PickStep& first, int* hist) {
  const int K = p.g.topk, E = p.g.num_experts, k = threadIdx.x & 15;
  const int warp_first = static_cast<int>(threadIdx.x >> 4) & ~1;  // both halves of a warp loop alike
  PickStep s = first;
  for (int step = 0; warp_first + step < t_end; step += kPickUnroll * kPickHalves) {
    if (step > 0) load_pick_step(p, t_end, step, s);
#pragma unroll
    for (int j = 0; j < kPickUnroll; ++j) {
      const int64_t v = s.v[j];
      const int e =
          v >= 0 && v < E && (p.win.masked == 0 || rank_live(p.win, static_cast<int>(v) / p.g.local_experts))
              ? static_cast<int>(v)
              : -1;
      bool dup = false;  // an earlier pick of the token names the same expert
      for (int k2 = 0; k2 + 1 < K; ++k2) {
        const int e2 = __shfl_sync(~0u, e, k2, 16);
        dup = dup || (k2 < k && e2 == e);
      }
      if (e >= 0 && !dup) atomicAdd(&hist[e], 1);
    }
  }
}

// Warp 0: token t's header words from its picks (lane k < K holds pick k in `v`). hist[e] counts the
// tokens before t that picked e; it is advanced past t.
__device__ void token_header(const LlDispatchParams& p, int t, int64_t v, SendShared& sh) {
  const int lane = threadIdx.x & 31, K = p.g.topk, E = p.g.num_experts, EL = p.g.local_experts;
  int e = -1;
  if (lane < K) {
    if (v >= 0 && v < E)
      e = p.win.masked == 0 || rank_live(p.win, static_cast<int>(v) / EL) ? static_cast<int>(v)
                                                                          : -1;  // masked: -1
    else if (v != -1)
      ll_flag_bad_expert(p.st, t, lane, v);
  }
  int first = lane;  // first slot naming the same expert
#pragma unroll
  for (int k = 0; k < kLlMaxTopk; ++k) {
    const int ek = __shfl_sync(~0u, e, k);
    if (k < lane && first == lane && e >= 0 && ek == e) first = k;
  }
  const bool dup = first != lane;
  int pos = e >= 0 && !dup ? sh.hist[e] : 0;
  pos = __shfl_sync(~0u, pos, first);
  __syncwarp();
  if (e >= 0 && !dup) sh.hist[e] = pos + 1;  // distinct experts per lane: no conflicts
  const uint64_t mask = ll_warp_or(e >= 0 ? 1ull << (e / EL) : 0ull);
  if (lane < K) {
    sh.expert[lane] = e;
    sh.word[lane] = e >= 0 ? (e % EL) | (pos << 10) | (static_cast<int>(dup) << 30) : -1;
  }
  if (lane == 0) sh.mask = mask;
}

__device__ __forceinline__ char* message(const LlDispatchParams& p, const SendShared& sh, int d, int t) {
  const LlGeometry& g = p.g;
  return ll_area(sh.window[d], g, p.parity) + g.msg_offset +
         (static_cast<int64_t>(p.win.rank) * g.capacity + t) * g.msg_bytes;
}

// Token t's BF16 row into registers. FP8: pair it = 2c', 2c' + 1 holds chunk c = c' * kLlThreads +
// threadIdx.x (vectors 2c, 2c + 1: 16 channels); BF16: xr[it] holds vector it * kLlThreads + threadIdx.x.
__device__ __forceinline__ void load_x(const LlDispatchParams& p, int t, int4 (&xr)[kXVecs]) {
  const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) +
                                                  static_cast<int64_t>(t) * p.x_row_stride * 2);
  const int vecs = p.g.hidden / 8;
#pragma unroll
  for (int it = 0; it < kXVecs; ++it) {
    const int v = p.fp8 ? 2 * ((it / 2) * kLlThreads + static_cast<int>(threadIdx.x)) + (it & 1)
                        : it * kLlThreads + static_cast<int>(threadIdx.x);
    xr[it] = v < vecs ? ld_nc_v4(row + v) : make_int4(0, 0, 0, 0);
  }
}

// All threads: token t (in registers) cast to FP8 (16 channels per thread, 8 threads per 128-channel
// group) and written with its scales into the message of every destination in `mask`. Bit-exact with the
// oracle's cast.
__device__ void send_row_fp8(const LlDispatchParams& p, const SendShared& sh, int t, uint64_t mask,
                             const int4 (&xr)[kXVecs]) {
  const LlGeometry& g = p.g;
  const int chunks = g.hidden / 16;
#pragma unroll
  for (int it = 0; it < kXVecs / 2; ++it) {
    const int base = it * kLlThreads;
    if (base >= chunks) break;  // block-uniform: shuffles stay converged
    const int c = base + threadIdx.x;
    const bool valid = c < chunks;
    const int4 raw[2] = {xr[2 * it], xr[2 * it + 1]};  // zeros where not valid
    const Fp8Piece piece = cast_fp8_piece(raw, c, valid, p.round_scale, p.ue8m0);
    for (uint64_t m = mask; m != 0; m &= m - 1) {
      char* msg = message(p, sh, __ffsll(static_cast<long long>(m)) - 1, t);
      if (valid) reinterpret_cast<int4*>(msg)[c] = piece.data;
      if (piece.write_scale) reinterpret_cast<uint32_t*>(msg + g.row_bytes)[piece.scale_index] = piece.scale;
    }
  }
}

__device__ void send_row_bf16(const LlDispatchParams& p, const SendShared& sh, int t, uint64_t mask,
                              const int4 (&xr)[kXVecs]) {
  const int vecs = p.g.hidden / 8;
#pragma unroll
  for (int it = 0; it < kXVecs; ++it) {
    const int c = it * kLlThreads + threadIdx.x;
    if (c < vecs)
      for (uint64_t m = mask; m != 0; m &= m - 1)
        reinterpret_cast<int4*>(message(p, sh, __ffsll(static_cast<long long>(m)) - 1, t))[c] = xr[it];
  }
}

// Send half, every block. Block G - 1 counts all tokens and writes the meta words; blocks [0, S) own
// contiguous token ranges (with one block, it does both). Returns false in every thread of a block whose
// wait failed (the block has left the protocol).
__device__ bool dispatch_send(const LlDispatchParams& p, uint64_t n, SendShared& sh, int* failed) {
  const SymmetricView& w = p.win;
  const LlGeometry& g = p.g;
  const int me = w.rank, R = g.num_ranks, T = p.num_tokens, K = g.topk, E = g.num_experts,
            EL = g.local_experts;
  const int G = gridDim.x, S = G > 1 ? G - 1 : 1;
  const bool meta_block = blockIdx.x == G - 1;
  const int b = blockIdx.x;
  const int t0 = b < S ? static_cast<int>(static_cast<int64_t>(b) * T / S) : 0;
  const int t1 = b < S ? static_cast<int>(static_cast<int64_t>(b + 1) * T / S) : 0;
  if (!meta_block && t0 >= t1) return true;  // block-uniform: nothing to write

  // One round of loads before the first barrier: this block's first row, its first token's picks (warp
  // 0), the picks to count (all tokens for the meta words, else those before the range), and the "free"
  // signals (last R threads; an acquire does not hold back the loads issued before it).
  int4 xr[kXVecs];
  if (t0 < t1) load_x(p, t0, xr);
  int64_t own = -1;
  if (t0 < t1 && threadIdx.x < K) own = pick(p, t0, threadIdx.x);
  const int t_count = meta_block ? T : t0;  // the tokens whose picks this block counts
  PickStep first;
  load_pick_step(p, t_count, 0, first);
  for (int i = threadIdx.x; i < E; i += kLlThreads) sh.hist[i] = 0;
  for (int i = threadIdx.x; i < R; i += kLlThreads) sh.window[i] = w.peer_base[i];
  const int fd = static_cast<int>(threadIdx.x) - (kLlThreads - R);  // receiver d of the last R threads
  if (fd >= 0 && rank_live(w, fd) &&
      !ll_wait_free(w, control::ll::kDispatchFree, p.parity, n, WaitSite::kLlDispatchFree, fd))
    *failed = 1;
  __syncthreads();
  count_picks(p, t_count, first, sh.hist);
  __syncthreads();
  if (*failed) return false;
  ll_stamp(p.trace, kDispSendLoaded);

  if (meta_block) {
    // Tagged words into every receiver: no fence, no flag (ll_protocol.cuh).
    const uint32_t tag = static_cast<uint32_t>(n);
    const int words = 4 + EL;
    for (int i = threadIdx.x; i < R * words; i += kLlThreads) {
      const int d = i / words, f = i - d * words;
      if (!rank_live(w, d)) continue;
      const int v = f == 0 ? T : f == 1 ? g.hidden : f == 2 ? K : f == 3 ? E : sh.hist[d * EL + f - 4];
      ll_st_relaxed_sys(
          ll_meta_word(ll_area(w.peer_base[d], g, p.parity), g, me, f < 4 ? f : kLlMetaHeader + f - 4),
          ll_tagged(tag, static_cast<uint32_t>(v)));
    }
    if (t0 >= t1) return true;
    // One block in the grid: it also sends, from token 0 (no picks before it).
    __syncthreads();
    for (int i = threadIdx.x; i < E; i += kLlThreads) sh.hist[i] = 0;
    __syncthreads();
  }

  for (int t = t0; t < t1; ++t) {
    if (threadIdx.x < 32) token_header(p, t, own, sh);
    __syncthreads();
    const uint64_t mask = sh.mask;
    if (p.fp8)
      send_row_fp8(p, sh, t, mask, xr);
    else
      send_row_bf16(p, sh, t, mask, xr);
    ll_stamp(p.trace, kDispSendCast);
    for (int i = threadIdx.x; i < R * K; i += kLlThreads) {  // every rank gets the header
      const int d = i / K, k = i - d * K, ek = sh.expert[k];
      if (!rank_live(w, d)) continue;
      reinterpret_cast<int32_t*>(message(p, sh, d, t) + g.header_offset)[k] =
          ek >= 0 && ek / EL == d ? sh.word[k] : -1;
    }
    if (threadIdx.x == 0) p.handle.dst_mask[t] = mask;
    if (t + 1 < t1) {
      load_x(p, t + 1, xr);
      if (threadIdx.x < K) own = pick(p, t + 1, threadIdx.x);
    }
    __syncthreads();  // sh is rewritten by the next header
  }
  ll_stamp(p.trace, kDispSendStored);
  // Publish, one flag per (receiver, token) of the range. The loop's last barrier ordered every thread's
  // stores before this point, and a system fence is cumulative over what its thread has observed, so only
  // the releasing threads fence (the fence waits for the block's NVLink stores); the other warps go on
  // to the receive half meanwhile. Every thread fencing before a barrier, then release stores (a second
  // fence each), took LL dispatch 22.2 us against 20.1 with this (2x H200, 2026-11-28).
  if (fd >= 0 && rank_live(w, fd)) {
    __threadfence_system();
    char* area = ll_area(w.peer_base[fd], g, p.parity);
    for (int t = t0; t < t1; ++t) ll_st_relaxed_sys(ll_dflag(area, g, me, t), n);
  }
  ll_stamp(p.trace, kDispSendFenced);  // the releasing warp: fenced and flagged; the others: at once
  ll_stamp(p.trace, kDispSendFlagged);
  return true;
}

// Receive half: expand every message into the rows of the local experts it picked, as it lands.
__device__ bool dispatch_recv(const LlDispatchParams& p, uint64_t n, RecvShared& sh, int* failed) {
  const SymmetricView& w = p.win;
  const LlGeometry& g = p.g;
  const int me = w.rank, R = g.num_ranks, EL = g.local_experts, K = g.topk, N = g.capacity;
  const WaitContext ctx{w.record, w.timeout_ns, me};
  char* area = ll_area(w.local_base, g, p.parity);

  // Every source's meta words: T_s, the shape (ranks that disagree misread each other's areas: stop and
  // name the argument), the per-expert counts. One word per thread, all polled at once.
  const uint32_t tag = static_cast<uint32_t>(n);
  const int words = 4 + EL;
  for (int i = threadIdx.x; i < R * words; i += kLlThreads) {
    const int s = i / words, f = i - s * words;
    if (!rank_live(w, s)) {  // a masked source sends nothing
      if (f == 0) sh.tokens[s + 1] = 0;
      if (f >= 4) sh.begin[(f - 4) * R + s] = 0;
      continue;
    }
    uint64_t word;
    if (!ll_wait_tag(ll_meta_word(area, g, s, f < 4 ? f : kLlMetaHeader + f - 4), tag, ~0u, ctx,
                     WaitSite::kLlDispatchData, s, p.parity, word)) {
      *failed = 1;
      break;
    }
    const int v = static_cast<int>(static_cast<uint32_t>(word));
    if (f == 0) {
      sh.tokens[s + 1] = min(max(v, 0), N);
    } else if (f < 4) {
      const int ours = f == 1 ? g.hidden : f == 2 ? g.topk : g.num_experts;
      if (v != ours) {
        record_timeout(ctx, WaitSite::kMismatch, s, f - 1, static_cast<uint64_t>(ours),
                       static_cast<uint64_t>(v), 0);
        *failed = 1;
      }
    } else {
      sh.begin[(f - 4) * R + s] = v;  // the count; turned into the prefix below
    }
  }
  __syncthreads();
  if (*failed) return false;
  if (threadIdx.x == 0) {
    sh.tokens[0] = 0;
    for (int s = 0; s < R; ++s) {
      if (blockIdx.x == 0) p.handle.src_tokens[s] = sh.tokens[s + 1];
      sh.tokens[s + 1] += sh.tokens[s];
    }
  }
  ll_expert_prefix(p.out, sh.begin, EL, R, kLlThreads);
  __syncthreads();
  ll_stamp(p.trace, kDispRecvMeta);

  // Work units: (message, segment of kLlSegmentVecs vectors of its row), one warp each, spread over the
  // blocks first. A unit waits only for its own message's flag.
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t vecs = g.row_bytes / 16;
  const int nseg = static_cast<int>((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  const int64_t units = static_cast<int64_t>(sh.tokens[R]) * nseg;
  for (int64_t u = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * kLlWarps) {
    const int m = static_cast<int>(u / nseg), q = static_cast<int>(u - static_cast<int64_t>(m) * nseg);
    int s = 0;
    while (sh.tokens[s + 1] <= m) ++s;
    const int t = m - sh.tokens[s];
    bool ok = true;
    if (lane == 0) ok = wait_geq(ll_dflag(area, g, s, t), n, ctx, WaitSite::kLlDispatchData, s, p.parity);
    __syncwarp();
    if (!__shfl_sync(~0u, ok, 0)) {
      if (lane == 0) *failed = 1;
      break;
    }
    ll_stamp(p.trace, kDispRecvFlag);
    const char* msg = area + g.msg_offset + (static_cast<int64_t>(s) * N + t) * g.msg_bytes;
    ll_expand_unit<true>(p.out, p.handle.tok_slots, msg, {g.row_bytes, g.scale_cols, g.header_offset},
                         sh.begin, s, t, q, K, EL, R, N, lane);
  }
  ll_stamp(p.trace, kDispRecvExpanded);
  __syncthreads();
  ll_stamp(p.trace, kDispRecvEnd);
  return *failed == 0;
}

__global__ void __launch_bounds__(kLlThreads, 1)
    ll_dispatch_kernel(const __grid_constant__ LlDispatchParams p) {
  __shared__ SendShared send_sh;
  __shared__ RecvShared recv_sh;
  __shared__ int failed;
  const bool send = (p.phases & kLlSend) != 0, recv = (p.phases & kLlRecv) != 0;
  const uint64_t n_send = ll_use(p.st, kLlSeqDispatchSend + p.parity);
  const uint64_t n_recv = ll_use(p.st, kLlSeqDispatchRecv + p.parity);
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  if (send) ll_stamp(p.trace, kDispSendBegin);
  if (send && !dispatch_send(p, n_send, send_sh, &failed)) return;
  if (recv) ll_stamp(p.trace, kDispRecvBegin);
  if (recv && !dispatch_recv(p, n_recv, recv_sh, &failed)) return;
  // Every block has read this use's area (receive) and its use counts: free the area, advance the counts.
  if (ll_block_done(&p.st.done[(recv ? kLlDoneDispatchRecv : kLlDoneDispatchSend) + p.parity])) {
    if (recv && threadIdx.x < p.g.num_ranks && rank_live(p.win, threadIdx.x))
      st_release_sys(
          ll_signal(p.win.peer_base[threadIdx.x], control::ll::kDispatchFree, p.parity, p.win.rank), n_recv);
    if (threadIdx.x == 0) {
      if (send) p.st.seq[kLlSeqDispatchSend + p.parity] = n_send;
      if (recv) p.st.seq[kLlSeqDispatchRecv + p.parity] = n_recv;
    }
  }
  ll_stamp(p.trace, kDispEnd);
}

}  // namespace

int ll_dispatch_blocks_per_sm() {
  return ll_blocks_per_sm(ll_dispatch_kernel);
}

void launch_ll_dispatch(const LlDispatchParams& p, int grid, cudaStream_t stream) {
  LlDispatchParams q = p;
  q.trace = ll_trace_arm(LlTraceKind::kDispatch, grid, p.phases, stream);
  ll_launch_cooperative(ll_dispatch_kernel, q, grid, stream);
}

}  // namespace expertlink::kernels
