// HT dispatch: every token row is read once and written straight to each destination. Protocol and
// buffer layout: ht_protocol.cuh.
#include <cstdlib>
#include <cstring>

#include "check.hpp"
#include "kernels/ht_protocol.cuh"

namespace expertlink::kernels {
namespace {

__device__ __forceinline__ uint64_t warp_dest_mask(const int32_t* send_pos_row, int R, int lane, int& pos_lo,
                                                   int& pos_hi) {
  pos_lo = lane < R ? send_pos_row[lane] : -1;
  pos_hi = lane + 32 < R ? send_pos_row[lane + 32] : -1;
  return static_cast<uint64_t>(__ballot_sync(~0u, pos_lo >= 0)) |
         (static_cast<uint64_t>(__ballot_sync(~0u, pos_hi >= 0)) << 32);
}

// Warps of a dispatch block that send (the rest copy rows out of the receiving area). Measured on 2x H200
// (2026-11-28, T = 4096, H = 7168, 24 / 8 SMs), against 16 senders: 24 made FP8 dispatch -1.8 / -5.6 %
// and BF16 -0.6 / -3.4 %; 20 about half that; 12 was 9-17 % slower. EXPERTLINK_HT_DISPATCH_SENDERS (a build
// option) sets it for experiments; bulk sending has stages for kBulkSendWarps warps and keeps that count.
#ifndef EXPERTLINK_HT_DISPATCH_SENDERS
#define EXPERTLINK_HT_DISPATCH_SENDERS 24
#endif
static_assert(EXPERTLINK_HT_DISPATCH_SENDERS >= 1 && EXPERTLINK_HT_DISPATCH_SENDERS < kHtThreads / 32,
              "EXPERTLINK_HT_DISPATCH_SENDERS: 1..31");
// The same for direct dispatch, whose receiving warps copy only the records' small data. 2x H200,
// 2026-11-28, against 28 (FP8, 24 / 8 SMs): 31 (one receiving warp) 169 -> 240 / 306 -> 447 us, the small
// data's copy-out setting the pace; 30 was mixed. EXPERTLINK_HT_DIRECT_SENDERS (a build option) sets it.
#ifndef EXPERTLINK_HT_DIRECT_SENDERS
#define EXPERTLINK_HT_DIRECT_SENDERS 28
#endif
static_assert(EXPERTLINK_HT_DIRECT_SENDERS >= 1 && EXPERTLINK_HT_DIRECT_SENDERS < kHtThreads / 32,
              "EXPERTLINK_HT_DIRECT_SENDERS: 1..31");

// Scale columns a sending lane holds in registers per row (32 per step: 64 covers FP8 rows up to hidden
// 8192 with float32 scales).
constexpr int kScaleRegs = 2;

// Sending warps run free (SendSteps: no barrier per chunk) up to this many SMs, and in step with the
// block's others (a role barrier per chunk) above. 2x H200, 2026-11-28, one call (T = 4096, H = 7168,
// 28 direct / 24 plain senders, us at 24 / 8 SMs), barrier -> free: direct FP8 169.0 -> 180.6 / 306.2
// -> 265.1, direct BF16 245.3 -> 254.8 / 460.4 -> 401.5, FP8 177.7 -> 193.3 / 338.0 -> 317.8, BF16
// 260.7 -> 281.8 / 551.1 -> 525.7. At 16 / 12 SMs (another call): direct FP8 192.3 -> 180.2 / 228.8 ->
// 203.3, direct BF16 277.0 -> 258.1 / 334.9 -> 294.8, FP8 205.8 -> 203.4 / 249.3 -> 239.6, BF16 313.6 ->
// 312.4 / 394.7 -> 378.7. EXPERTLINK_HT_FREE_SEND_MAX_SMS (environment, read once) sets it for
// experiments (0: never free-running).
constexpr int kFreeSendMaxSms = 16;

// Free-running blocks with a publisher warp (publisher_step): the last of the sending warps publishes the
// chunks and sends no rows, so no row warp waits for a flag's fence. 2x H200, 2026-11-28, one call against
// the last warp done publishing (us at 24 / 8 SMs, free-running at both): direct FP8 dispatch 165.2 /
// 248.8 -> 164.7 / 235.9, FP8 175.2 / 301.8 -> 175.9 / 300.6, exact 185.6 / 321.1 -> 191.0 / 318.3; at
// 24 SMs free-running then no longer loses to the barrier (it did by 12-14 us), but does not win either.
// EXPERTLINK_HT_PUBLISHER=0 (a build option) restores the last warp publishing.
#ifndef EXPERTLINK_HT_PUBLISHER
#define EXPERTLINK_HT_PUBLISHER 1
#endif

// kDirect: direct dispatch (HtDispatchParams::direct_offset >= 0), compiled apart so that the default
// path keeps its registers. kFree: free-running sending warps (not with bulk sending).
template <bool kBulk, bool kDirect, bool kFree>
__global__ void __launch_bounds__(kHtThreads, 1) ht_dispatch_kernel(HtDispatchParams p) {
  static_assert(!(kBulk && kFree), "bulk sending publishes its chunks behind a role barrier");
  __shared__ int abort_flag, recv_abort, send_abort;
  __shared__ int ticket[2][2];  // [role][parity]: the role's current and next chunk or item (draw_ticket)
  __shared__ uint64_t stage_bar[kBulkSendWarps][2];
  __shared__ SendSteps steps;  // kFree
  extern __shared__ __align__(128) char stage_smem[];
  wait_prior_grids();  // launched as a dependent of notify (kernels/pdl.hpp): nothing is read before it
  const SymmetricView& w = p.win;
  const int me = w.rank, R = w.num_ranks, T = p.num_tokens, K = p.topk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int S = kBulk     ? kBulkSendWarps
                    : kDirect ? EXPERTLINK_HT_DIRECT_SENDERS
                              : EXPERTLINK_HT_DISPATCH_SENDERS;  // warps [0, S) send
  constexpr bool kPublisher = kFree && EXPERTLINK_HT_PUBLISHER;
  constexpr int kRowWarps = kPublisher ? S - 1 : S;  // sending warps that write rows
  const uint64_t round = p.state.rounds[1] + 1;
  const WaitContext ctx{w.record, w.timeout_ns, me};
  const int experts_per_rank = p.num_experts > 0 ? p.num_experts / R : 1;
  const int64_t vecs = p.row_bytes / 16, capacity = p.handle.capacity;
  const int elem_bytes = p.kind == RowKind::kBf16 ? 2 : 1;

  // Direct: this rank's receive region is overwritten from here on (peers' rows, and its own), so every
  // rank that read it in a direct combine must be done before block 0 announces "ready". (A timeout is
  // recorded, and wait_aborted below ends the call.)
  if (kDirect && blockIdx.x == 0) {
    (void)wait_direct_readers_done(w, p.state, ctx);
    __syncthreads();
  }
  // Announce that this rank's receiving area is free for this round (and how it places its rows); then
  // wait for every destination's.
  if (blockIdx.x == 0 && threadIdx.x < R && threadIdx.x != me && rank_live(w, threadIdx.x))
    announce_round(w, threadIdx.x, control::kDispatchReady, control::kDispatchMode, round, kDirect);
  if (threadIdx.x == 0) {
    abort_flag = wait_aborted(ctx);  // e.g. ranks disagreed in notify
    send_abort = 0;
    if (!kFree) ticket[kSendRole][0] = draw_ticket(p.state, 1, kSendRole);
  }
  if (kFree) init_send_steps(steps);
  if (threadIdx.x == S * 32) ticket[kRecvRole][0] = draw_ticket(p.state, 1, kRecvRole);
  WarpStages stages{};
  if (kBulk && warp < S) stages = warp_stages(stage_smem, stage_bar, warp, lane);
  __syncthreads();
  if (abort_flag) return;
  // Its rows go where this rank expects them only if both dispatch direct or neither does.
  if (threadIdx.x < R && threadIdx.x != me && T > 0 && rank_live(w, threadIdx.x) &&
      !wait_round_same_mode(w, threadIdx.x, control::kDispatchReady, control::kDispatchMode, round, kDirect,
                            ctx, WaitSite::kHtDispatchReady, 3))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;

  // Free-running: the calling warp publishes chunk c (the block's step k) to every other live rank.
  auto warp_publish = [&](int k, int c) {
    if (lane == 0) ht_stamp(p.trace, k, kHtSendIssued);
    for (int d = lane; d < R; d += 32)
      if (d != me && rank_live(w, d))
        publish_chunk<false>(control_u64(w.peer_base[d], control::kDispatchChunk, me * kMaxChunks + c),
                             round);
    if (lane == 0) ht_stamp(p.trace, k, kHtSendPublished);
  };

  if (kPublisher && warp == kRowWarps) {
    // ---- publisher (the last sending warp): every chunk once the row warps are done with it ----
    const int num_chunks = ht_num_chunks(T);
    for (int k = 0;; ++k) {
      const int c = publisher_step(steps, k, kRowWarps, num_chunks, lane, ctx);
      if (c < 0 || c >= num_chunks) break;
      warp_publish(k, c);
    }
  } else if (warp < S) {
    // ---- send (warps [0, S)): chunk c of this rank's tokens, each row to every destination ----
    const int chunk_tokens = ht_chunk_tokens(T), num_chunks = ht_num_chunks(T);
    const int64_t local_row0 = p.handle.rank_prefix[me];
    // Lane d's (and d + 32's) window, read once instead of once per token (a load between the row's
    // positions and its stores).
    char* const peer_lo = lane < R ? w.peer_base[lane] : nullptr;
    char* const peer_hi = lane + 32 < R ? w.peer_base[lane + 32] : nullptr;
    // Direct dispatch: lane d's (and d + 32's) first row at destination d.
    const int row0_lo = kDirect && lane < R ? p.handle.dest_row0[lane] : 0;
    const int row0_hi = kDirect && lane + 32 < R ? p.handle.dest_row0[lane + 32] : 0;
    for (int k = 0;; ++k) {
      const int c = kFree ? warp_step_chunk(steps, k, p.state, 1, lane) : ticket[kSendRole][k & 1];
      if (c >= num_chunks) break;
      if (kFree ? lane == 0 && warp == 0 : threadIdx.x == 0) ht_stamp(p.trace, k, kHtSendStart);
      const int t0 = c * chunk_tokens, t_end = min(T, t0 + chunk_tokens);
      // Warp w takes the chunk's tokens w, w + S, ...; free-running, the tokens t with t % S == w, so
      // that the chunks' surplus rows (chunk_tokens % S) fall to different warps from chunk to chunk
      // (S: the warps that write rows, kRowWarps).
      for (int t = kFree ? t0 + (warp - t0 % kRowWarps + kRowWarps) % kRowWarps : t0 + warp; t < t_end;
           t += kRowWarps) {
        int pos_lo, pos_hi;
        // A handle made before a rank was masked still names it: it gets nothing.
        uint64_t mask =
            warp_dest_mask(p.handle.send_pos + int64_t(t) * R, R, lane, pos_lo, pos_hi) & ~w.masked;
        const char* x_row = static_cast<const char*>(p.x.data) + t * p.x.row_stride * elem_bytes;
        // Row data first: each 16-byte vector of x is loaded once and stored to every destination. Lane
        // d (and d + 32) holds destination d's row address: its record in d's area, or with direct
        // dispatch its final row in d's receive region; null for a row past the capacity.
        auto row_address = [&](int d, char* peer, int pos, int row0) -> char* {
          if (d >= R || pos < 0) return nullptr;
          if (d == me) {
            const int64_t row = local_row0 + pos;
            return row < capacity ? static_cast<char*>(p.recv_x) + row * p.recv_x_row_stride * elem_bytes
                                  : nullptr;
          }
          if (kDirect) {
            const int64_t row = int64_t(row0) + pos;
            return row < p.direct_rows ? peer + kControlBytes + p.direct_offset + row * p.row_bytes : nullptr;
          }
          return area_segment(peer, p.area_offset, me, d, p.area_rows, p.record_bytes) + pos * p.record_bytes;
        };
        char* const dst_lo = row_address(lane, peer_lo, pos_lo, row0_lo);
        char* const dst_hi = row_address(lane + 32, peer_hi, pos_hi, row0_hi);
        if (kBulk && !warp_bulk_send(x_row, p.row_bytes, mask, dst_lo, dst_hi, stages, lane, ctx)) {
          send_abort = 1;
          break;  // to the chunk's barrier, then out
        }
        const int4* src = reinterpret_cast<const int4*>(x_row);
        for (int64_t v0 = 0; v0 < (kBulk ? 0 : vecs); v0 += 32 * kCopyUnroll) {
          int4 val[kCopyUnroll] = {};  // zeroed, as in warp_copy_row
#pragma unroll
          for (int u = 0; u < kCopyUnroll; ++u)
            if (v0 + u * 32 + lane < vecs) val[u] = ld_nc_v4(src + v0 + u * 32 + lane);
          for (uint64_t m = mask; m != 0; m &= m - 1) {
            const int d = __ffsll(m) - 1;
            int4* dst = reinterpret_cast<int4*>(
                __shfl_sync(~0u, reinterpret_cast<uintptr_t>(d < 32 ? dst_lo : dst_hi), d & 31));
            if (dst == nullptr) continue;
#pragma unroll
            for (int u = 0; u < kCopyUnroll; ++u)
              if (v0 + u * 32 + lane < vecs) dst[v0 + u * 32 + lane] = val[u];
          }
        }
        // Then the small per-row data: scales, remapped top-k, weights, source token. Loaded once for all
        // destinations and all at once (a store between two loads holds the second back until the first
        // returns, since they might alias): the first kScaleRegs * 32 scale columns (lane g + 32 i; more
        // are read in the destination loop), the top-k id and weight (lane k).
        int32_t sc[kScaleRegs];
#pragma unroll
        for (int i = 0; i < kScaleRegs; ++i) {
          const int g = lane + 32 * i;
          sc[i] = g < p.scale_cols
                      ? static_cast<const int32_t*>(
                            p.x_scales.data)[t * p.x_scales.row_stride + g * p.x_scales.col_stride]
                      : 0;
        }
        const int64_t pick =
            lane < K && p.topk_idx != nullptr
                ? load_index(p.topk_idx, p.idx_type, t * p.idx_row_stride + lane * p.idx_col_stride)
                : -1;
        const float weight =
            lane < K && p.topk_weights.data != nullptr
                ? static_cast<const float*>(
                      p.topk_weights.data)[t * p.topk_weights.row_stride + lane * p.topk_weights.col_stride]
                : 0.f;
        // The row's scales into a destination: slot(g) is column g's place there.
        auto put_scales = [&](auto slot) {
#pragma unroll
          for (int i = 0; i < kScaleRegs; ++i)
            if (lane + 32 * i < p.scale_cols) slot(lane + 32 * i) = sc[i];
          for (int g = lane + 32 * kScaleRegs; g < p.scale_cols; g += 32)
            slot(g) = static_cast<const int32_t*>(
                p.x_scales.data)[t * p.x_scales.row_stride + g * p.x_scales.col_stride];
        };
        while (mask != 0) {
          const int d = __ffsll(mask) - 1;
          mask &= mask - 1;
          const int pos = __shfl_sync(~0u, d < 32 ? pos_lo : pos_hi, d & 31);
          if (d == me) {
            const int64_t row = local_row0 + pos;
            if (row >= capacity) continue;
            put_scales([&](int g) -> int32_t& {
              return static_cast<int32_t*>(
                  p.recv_scales)[row * p.recv_scales_row_stride + g * p.recv_scales_col_stride];
            });
            if (lane < K && p.recv_topk_idx != nullptr) {
              bool here = pick >= 0 && pick / experts_per_rank == d;
              store_index(p.recv_topk_idx, p.idx_type, row * K + lane,
                          here ? pick - int64_t(d) * experts_per_rank : -1);
              if (p.recv_topk_weights != nullptr) p.recv_topk_weights[row * K + lane] = here ? weight : 0.f;
            }
            if (lane == 0) p.handle.recv_src_token[row] = t;
          } else {
            // The row's record (it starts with the row, unless the row went straight to its final place).
            char* rec = reinterpret_cast<char*>(
                __shfl_sync(~0u,
                            reinterpret_cast<uintptr_t>(kDirect ? (d < 32 ? peer_lo : peer_hi)
                                                                : (d < 32 ? dst_lo : dst_hi)),
                            d & 31));
            if (kDirect)
              rec =
                  area_segment(rec, p.area_offset, me, d, p.area_rows, p.record_bytes) + pos * p.record_bytes;
            int32_t* tail = reinterpret_cast<int32_t*>(rec + p.row_bytes);
            put_scales([&](int g) -> int32_t& { return tail[g]; });
            tail += p.scale_cols;
            if (lane < K && p.topk_idx != nullptr) {
              bool there = pick >= 0 && pick / experts_per_rank == d;
              tail[lane] = there ? static_cast<int32_t>(pick - int64_t(d) * experts_per_rank) : -1;
              reinterpret_cast<float*>(tail)[K + lane] = there ? weight : 0.f;
            }
            if (lane == 0) tail[2 * K] = t;
          }
        }
      }
      // Publish chunk c to every other rank (also when it sent them nothing): every sender thread's rows
      // (bulk stores complete first), then (barrier) the release stores of the round (publish_chunk).
      // Free-running, the publisher warp (or without it the last warp done with the chunk) publishes it,
      // and the others go on.
      if constexpr (kPublisher) {
        (void)warp_step_done(steps, k, kRowWarps, lane);  // the publisher warp takes it from here
        continue;
      } else if constexpr (kFree) {
        if (warp_step_done(steps, k, S, lane)) warp_publish(k, c);
        continue;
      }
      if (kBulk && lane == 0) bulk_wait_all();
      if (threadIdx.x == 0) ticket[kSendRole][(k + 1) & 1] = draw_ticket(p.state, 1, kSendRole);
      role_barrier(kSendBarrier, S);
      if (kBulk && send_abort) break;
      if (threadIdx.x == 0) ht_stamp(p.trace, k, kHtSendIssued);
      if (threadIdx.x < R && threadIdx.x != me && rank_live(w, threadIdx.x)) {
        publish_chunk<kBulk>(
            control_u64(w.peer_base[threadIdx.x], control::kDispatchChunk, me * kMaxChunks + c), round);
        ht_stamp(p.trace, k, kHtSendPublished);
      }
    }
  } else {
    // ---- receive (the other warps): copy (source, chunk) items of rows out of the area as they arrive ----
    constexpr int kRecvWarps = kHtThreads / 32 - S;
    const int rwarp = warp - S, rtid = threadIdx.x - S * 32;
    const int items = source_chunk_items(w, p.handle.src_tokens);
    for (int k = 0, mine = 0;; ++k) {  // tickets drawn; items this block waited for
      const int item = ticket[kRecvRole][k & 1];
      if (item >= items) break;
      const SourceChunk sc = source_chunk(w, p.handle.src_tokens, item);
      const int s = sc.source, c = sc.chunk;
      const int32_t* chunk_prefix = p.handle.chunk_prefix + s * (kMaxChunks + 1);
      const int r0 = sc.valid ? chunk_prefix[c] : 0, r1 = sc.valid ? chunk_prefix[c + 1] : 0;
      const int m = mine;
      if (r0 < r1) {
        ++mine;
        if (rtid == 0) {
          ht_stamp(p.trace, m, kHtRecvWait);
          recv_abort = !wait_geq(control_u64(w.local_base, control::kDispatchChunk, s * kMaxChunks + c),
                                 round, ctx, WaitSite::kHtDispatchChunk, s, c);
        }
        role_barrier(kRecvBarrier, kRecvWarps);
        if (rtid == 0) ht_stamp(p.trace, m, kHtRecvArrived);
        if (recv_abort) break;
        const int64_t row0 = p.handle.rank_prefix[s];
        const char* seg = area_segment(w.local_base, p.area_offset, s, me, p.area_rows, p.record_bytes);
        for (int r = r0 + rwarp; r < r1; r += kRecvWarps) {
          const int64_t row = row0 + r;
          if (row >= capacity) continue;
          const char* rec = seg + int64_t(r) * p.record_bytes;
          if (!kDirect) {  // else the row is in place already: only the record's tail is copied
            char* dst = static_cast<char*>(p.recv_x) + row * p.recv_x_row_stride * elem_bytes;
            warp_copy_row<false>(reinterpret_cast<const int4*>(rec), reinterpret_cast<int4*>(dst), vecs,
                                 lane);
          }
          // The record's tail, every word loaded before any is stored (as on the sending side).
          const int32_t* tail = reinterpret_cast<const int32_t*>(rec + p.row_bytes);
          const int32_t* tail_topk = tail + p.scale_cols;
          int32_t sc[kScaleRegs];
#pragma unroll
          for (int i = 0; i < kScaleRegs; ++i)
            sc[i] = lane + 32 * i < p.scale_cols ? __ldcg(tail + lane + 32 * i) : 0;
          const int32_t idx = lane < K ? __ldcg(tail_topk + lane) : -1;
          const float weight = lane < K ? __ldcg(reinterpret_cast<const float*>(tail_topk) + K + lane) : 0.f;
          const int32_t src_token = lane == 0 ? __ldcg(tail_topk + 2 * K) : 0;
          auto scale_slot = [&](int g) -> int32_t& {
            return static_cast<int32_t*>(
                p.recv_scales)[row * p.recv_scales_row_stride + g * p.recv_scales_col_stride];
          };
#pragma unroll
          for (int i = 0; i < kScaleRegs; ++i)
            if (lane + 32 * i < p.scale_cols) scale_slot(lane + 32 * i) = sc[i];
          for (int g = lane + 32 * kScaleRegs; g < p.scale_cols; g += 32) scale_slot(g) = __ldcg(tail + g);
          if (lane < K && p.recv_topk_idx != nullptr) {
            store_index(p.recv_topk_idx, p.idx_type, row * K + lane, idx);
            if (p.recv_topk_weights != nullptr) p.recv_topk_weights[row * K + lane] = weight;
          }
          if (lane == 0) p.handle.recv_src_token[row] = src_token;
        }
      }
      if (rtid == 0) ticket[kRecvRole][(k + 1) & 1] = draw_ticket(p.state, 1, kRecvRole);
      // The next ticket is visible; recv_abort is rewritten for the next item.
      role_barrier(kRecvBarrier, kRecvWarps);
      if (r0 < r1 && rtid == 0) ht_stamp(p.trace, m, kHtRecvDone);
    }
  }
  if (blockIdx.x == 0 && p.recv_expert_count != nullptr)
    for (int j = threadIdx.x; j < experts_per_rank && p.num_experts > 0; j += blockDim.x)
      p.recv_expert_count[j] = p.handle.expert_count[j];
  finish_round(p.state, 1, round);
}

// Bulk sending, or warp copies in step (a role barrier per chunk) or free-running.
template <bool kDirect>
void launch_dispatch(const HtDispatchParams& q, int num_sms, bool free, cudaStream_t stream) {
  launch_ht_kernel(
      ht_dispatch_kernel<true, kDirect, false>,
      free ? ht_dispatch_kernel<false, kDirect, true> : ht_dispatch_kernel<false, kDirect, false>, q, num_sms,
      stream);
}

}  // namespace

bool ht_bulk_send() {
  const char* v = std::getenv("EXPERTLINK_HT_COPY");
  return v != nullptr && std::strcmp(v, "bulk") == 0;
}

void launch_ht_dispatch(const HtDispatchParams& p, int num_sms, cudaStream_t stream) {
  HtDispatchParams q = p;
  q.trace = ht_trace_arm(HtTraceKind::kDispatch, num_sms, stream);
  static const int free_max_sms = [] {
    const char* v = std::getenv("EXPERTLINK_HT_FREE_SEND_MAX_SMS");
    return v != nullptr ? std::atoi(v) : kFreeSendMaxSms;
  }();
  const bool free = num_sms <= free_max_sms;
  if (q.direct_offset >= 0)
    launch_dispatch<true>(q, num_sms, free, stream);
  else
    launch_dispatch<false>(q, num_sms, free, stream);
}

}  // namespace expertlink::kernels
