// HT combine: expert outputs go back to their source ranks and are summed per token in float32, in
// ascending rank order (the oracle's order). Protocol and buffer layout: ht_protocol.cuh.

#include "check.hpp"
#include "kernels/ht_protocol.cuh"

namespace expertlink::kernels {
namespace {

// Threads per combine block, by SM budget: fewer threads get more registers each (768: 80), for more
// loads in flight per warp without spills. 2x H200, combine at 24 / 16 / 8 SMs: 1024 threads 237.6 /
// 274.9 / 482.5 us, 896: 234.2 / 273.0 / 471.8, 768: 232.8 / 268.1 / 464.2, 640: 238.3 / 259.3 / 446.4
// (docs/ht_performance.md), so 640 up to kFewSms SMs and 768 above. EXPERTLINK_HT_COMBINE_THREADS (a
// build option) sets one count for every budget, for experiments.
// Direct (pull) combine up to kFewSms SMs: 512 threads, so 128 registers for 14 vectors per lane per row in
// flight (two passes over a 7168-wide row pair instead of four): 2x H200, 2026-11-28, at 8 SMs 288.1 ->
// 273.6 us, and 291.6 -> 271.9 in the call that merged it (with 512 threads for every combine, the push
// combine lost 426.5 -> 485.1 and direct combine at 24 SMs 222.4 -> 230.1, so only the pull kernel, only
// at few SMs; 12 and 16 SMs not measured). 12 vectors (no spills) took 311.2 us at 8 SMs.
#ifdef EXPERTLINK_HT_COMBINE_THREADS
inline constexpr int kCombineThreadsFew = EXPERTLINK_HT_COMBINE_THREADS;
inline constexpr int kCombineThreadsMany = EXPERTLINK_HT_COMBINE_THREADS;
inline constexpr int kPullThreadsFew = EXPERTLINK_HT_COMBINE_THREADS;
#else
inline constexpr int kCombineThreadsFew = 640;
inline constexpr int kCombineThreadsMany = 768;
inline constexpr int kPullThreadsFew = 512;
#endif
inline constexpr int kFewSms = 16;
// A block's warps [0, kCombineSendWarps) send this rank's expert outputs back to their sources, then join
// the reduce; the other warps reduce from the start. The reduce is bound by the loads it has in flight
// (4 vectors of 16 bytes per lane per source row), so it gets most of the warps. Measured on 2x H200 with
// 1024 threads (2026-11-28, T = 4096, H = 7168, 24 / 16 / 8 SMs): 16 senders 302 / 348 / 595 us, 12: 283 /
// 324 / 553, 10: 274 / 314 / 544, 8: 267 / 311 / 525; 6 and 4 collapsed at 16 and 24 SMs (2000+ us). The bulk
// (TMA) reduce that was the default with 16 senders needs 12 KB of shared memory per reducing warp, so it
// cannot have more than 18 of them; with 14 it took 308 / 375 / 668 us, and it was removed
// (docs/ht_performance.md). EXPERTLINK_HT_COMBINE_SENDERS (a build option) sets the count for experiments.
#ifndef EXPERTLINK_HT_COMBINE_SENDERS
#define EXPERTLINK_HT_COMBINE_SENDERS 8
#endif
inline constexpr int kCombineSendWarps = EXPERTLINK_HT_COMBINE_SENDERS;
// Every warp of a block may wait on the same chunk's flag, so their polls are spaced (2x H200,
// 2026-11-28: 200 ns gave combine -0.2 to -1.2 % with 8 senders and -9 % at 24 SMs with 6, where back to
// back polling slowed the senders). EXPERTLINK_HT_POLL_SLEEP_NS (a build option) sets it.
#ifndef EXPERTLINK_HT_POLL_SLEEP_NS
#define EXPERTLINK_HT_POLL_SLEEP_NS 200
#endif
// 16-byte vectors per lane in flight from each source row (EXPERTLINK_HT_REDUCE_UNROLL, a build option;
// ptxas at 1024 threads, 64 registers: 4 spilled 300 bytes, 3 156, 2 none; at 768 threads none spills).
#ifndef EXPERTLINK_HT_REDUCE_UNROLL
#define EXPERTLINK_HT_REDUCE_UNROLL 4
#endif
// Vectors per lane per row in flight in the two-row reduce (both rows' at once); 0 turns it off
// (EXPERTLINK_HT_PAIR_UNROLL, a build option). Direct combine reads one of the two rows over NVLink and
// wants more in flight: 2x H200, 2026-11-28, 4 -> 8 took direct combine 216.5 -> 212.9 us at 24 SMs
// and 335.2 -> 281.2 at 8, but the push combine 233.4 -> 244.2 and 455.3 -> 468.3 (ptxas: no spills at
// 640 threads, 20 bytes at 768).
#ifndef EXPERTLINK_HT_PAIR_UNROLL
#define EXPERTLINK_HT_PAIR_UNROLL 4
#endif
#ifndef EXPERTLINK_HT_PULL_PAIR_UNROLL
#define EXPERTLINK_HT_PULL_PAIR_UNROLL 8
#endif
#ifndef EXPERTLINK_HT_PULL_PAIR_UNROLL_FEW  // the pull kernel with kPullThreadsFew threads
#define EXPERTLINK_HT_PULL_PAIR_UNROLL_FEW 14
#endif
static_assert(kCombineSendWarps >= 1 && kCombineSendWarps <= kBulkSendWarps &&
                  kCombineSendWarps < kCombineThreadsFew / 32 && kCombineSendWarps < kCombineThreadsMany / 32,
              "EXPERTLINK_HT_COMBINE_SENDERS: 1..16 (bulk sending has stages for 16 warps)");

// Direct combine: where a rank's staged top-k weights are in its window (`base`): its combine area (unused
// by direct combine), float [N_recv, K], row r = the receive region's row r. ht_stage_weights_kernel writes
// them there; the sources read them (sum_pulled_weights).
__device__ __forceinline__ float* staged_weights(char* base, const HtCombineParams& p) {
  return reinterpret_cast<float*>(base + kControlBytes + p.area_offset);
}
// Direct combine: the row of a holder's receive region that holds this rank's `pos`-th row there (row0: the
// holder's dest_row0 of this rank). A row past the region, which only an over-capacity round at the holder
// can ask for, is clamped to the last (the holder has raised that round's error).
__device__ __forceinline__ int64_t direct_row(const HtCombineParams& p, int row0, int pos) {
  return min(int64_t(row0) + pos, p.direct_rows - 1);
}

// kPull: direct combine (HtCombineParams::direct_offset >= 0): no sending half; every warp reduces, reading
// each row from its holder's receive region over NVLink.
template <bool kBulk, int kThreads, bool kPull>
__global__ void __launch_bounds__(kThreads, 1) ht_combine_kernel(HtCombineParams p) {
  // (14 vectors need 512 threads' 128 registers; with more threads per block the pull kernel keeps 8.)
  constexpr int kPairUnroll = !kPull            ? EXPERTLINK_HT_PAIR_UNROLL
                              : kThreads <= 512 ? EXPERTLINK_HT_PULL_PAIR_UNROLL_FEW
                                                : EXPERTLINK_HT_PULL_PAIR_UNROLL;
  __shared__ int abort_flag, send_abort, copy_abort;
  __shared__ int ticket[2];  // [parity]: the sending half's current and next item (draw_ticket)
  __shared__ uint32_t chunk_seen[kMaxChunks / 32];  // chunks whose rows have all arrived (reduce_tokens)
  __shared__ uint64_t stage_bar[kBulkSendWarps][2];
  extern __shared__ __align__(128) char stage_smem[];
  wait_prior_grids();  // a dependent launch (kernels/pdl.hpp): nothing is read before it
  const SymmetricView& w = p.win;
  const int me = w.rank, R = w.num_ranks, T = p.num_tokens, K = p.topk, H = p.hidden;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int S = kPull ? 0 : kCombineSendWarps;
  const uint64_t round = p.state.rounds[2] + 1;
  const WaitContext ctx{w.record, w.timeout_ns, me};
  const int64_t vecs = 2ll * H / 16;
  const bool with_weights = p.topk_weights.data != nullptr;
  // Peer d has started this combine round, and pulls or pushes as this rank does (else the mismatch is
  // recorded): the calling thread waits, bounded.
  auto peer_ready_same_mode = [&](int d) {
    return wait_round_same_mode(w, d, control::kCombineReady, control::kCombineMode, round, kPull, ctx,
                                WaitSite::kHtCombineReady, 4);
  };

  // A push combine right after a direct combine with weights (no dispatch between them): the peers may
  // still read the weights staged in this rank's combine area, which the pushed rows overwrite. Wait for
  // their "done reading" words first (a dispatch between the two, the usual order, has waited already).
  bool readers_done = true;
  if (!kPull && blockIdx.x == 0)  // a timeout is recorded: wait_aborted below
    readers_done = __syncthreads_and(wait_direct_readers_done(w, p.state, ctx));
  // Announce that this rank's combine area is free (push) or its expert outputs are readable (pull: every
  // earlier stream operation, the expert computation included, is done), and which of the two it does.
  if (readers_done && blockIdx.x == 0 && threadIdx.x < R && threadIdx.x != me && rank_live(w, threadIdx.x))
    announce_round(w, threadIdx.x, control::kCombineReady, control::kCombineMode, round, kPull);
  if (threadIdx.x == 0) {
    abort_flag = wait_aborted(ctx);
    send_abort = copy_abort = 0;
    ticket[0] = draw_ticket(p.state, 2, kSendRole);
  }
  if (threadIdx.x < kMaxChunks / 32) chunk_seen[threadIdx.x] = 0;
  WarpStages stages{};
  if (kBulk && warp < S) stages = warp_stages(stage_smem, stage_bar, warp, lane);
  __syncthreads();
  if (abort_flag) return;
  if (kPull) {  // every peer's rows readable, and every peer pulling too
    if (threadIdx.x < R && threadIdx.x != me && rank_live(w, threadIdx.x) &&
        !peer_ready_same_mode(threadIdx.x))
      abort_flag = 1;
    __syncthreads();
    if (abort_flag) return;
  }

  // ---- reduce: token by token. Each warp draws its own tokens (tickets, in token order) and waits for
  // every rank's flag of the token's chunk itself, so no warp waits for the others. Trace stamps: the
  // first reducing warp's view. ----
  auto reduce_tokens = [&]() {
    const int chunk_tokens = ht_chunk_tokens(T);
    const int64_t local_row0 = p.handle.rank_prefix[me];
    // Pull: lane d's (and d + 32's) window and this rank's first row in d's receive region.
    char* const peer_lo = kPull && lane < R ? w.peer_base[lane] : nullptr;
    char* const peer_hi = kPull && lane + 32 < R ? w.peer_base[lane + 32] : nullptr;
    const int row0_lo = kPull && lane < R ? p.handle.dest_row0[lane] : 0;
    const int row0_hi = kPull && lane + 32 < R ? p.handle.dest_row0[lane + 32] : 0;
    int ready_chunk = -1, k = -1;  // the chunk whose rows have all arrived; warp 0's stamped chunks
    int t = __shfl_sync(~0u, lane == 0 ? draw_ticket(p.state, 2, kRecvRole) : 0, 0);
    while (t < T) {
      const int next = lane == 0 ? draw_ticket(p.state, 2, kRecvRole) : 0;  // its latency overlaps the token
      // The token's positions are the handle's (not written by peers): requested before the flag's
      // acquire, so the two loads' latencies overlap.
      const int32_t* pos_row = p.handle.send_pos + int64_t(t) * R;
      const int pos_lo = lane < R ? pos_row[lane] : -1, pos_hi = lane + 32 < R ? pos_row[lane + 32] : -1;
      const int c = t / chunk_tokens;
      if (!kPull && c != ready_chunk) {  // pull: every peer's rows were ready at the start
        if (warp == S && lane == 0) {
          if (k >= 0) ht_stamp(p.trace, k, kHtRecvDone);
          ht_stamp(p.trace, k + 1, kHtRecvWait);
        }
        ++k;
        // A chunk another warp of this block has seen arrive needs no flag load: that warp acquired the
        // flags, then fenced and set the chunk's bit; this warp reads the bit, then fences (the two CTA
        // fences order its row reads after the peers' writes).
        const uint32_t bit = 1u << (c & 31);
        bool arrived = (*static_cast<volatile uint32_t*>(&chunk_seen[c >> 5]) & bit) != 0;
        if (!arrived) {
          arrived = true;
          for (int d = lane; d < R; d += 32)
            if (d != me && rank_live(w, d) &&
                !wait_geq(control_u64(w.local_base, control::kCombineChunk, d * kMaxChunks + c), round, ctx,
                          WaitSite::kHtCombineChunk, d, c, EXPERTLINK_HT_POLL_SLEEP_NS))
              arrived = false;
          if (!__all_sync(~0u, arrived)) break;  // recorded by wait_geq
          __syncwarp();                          // every lane's acquire before the bit and the rows
          __threadfence_block();
          if (lane == 0) atomicOr(&chunk_seen[c >> 5], bit);
        } else {
          __threadfence_block();
        }
        ready_chunk = c;
        if (warp == S && lane == 0) ht_stamp(p.trace, k, kHtRecvArrived);
      }
      const uint64_t mask = (static_cast<uint64_t>(__ballot_sync(~0u, pos_lo >= 0)) |
                             (static_cast<uint64_t>(__ballot_sync(~0u, pos_hi >= 0)) << 32)) &
                            ~w.masked;
      // Rows of token t, rank ascending: the local one in place, the others from the combine area.
      auto row_of = [&](int d, int pos) -> const char* {
        if (d == me) return static_cast<const char*>(p.x.data) + (local_row0 + pos) * p.x.row_stride * 2;
        if constexpr (kPull) {  // d's row of this token in d's receive region
          const int64_t row = direct_row(p, __shfl_sync(~0u, d < 32 ? row0_lo : row0_hi, d & 31), pos);
          const char* base = reinterpret_cast<const char*>(
              __shfl_sync(~0u, reinterpret_cast<uintptr_t>(d < 32 ? peer_lo : peer_hi), d & 31));
          return base + kControlBytes + p.direct_offset + row * 2ll * H;
        }
        return area_segment(w.local_base, p.area_offset, d, me, p.area_rows, p.record_bytes) +
               int64_t(pos) * p.record_bytes;
      };
      char* out_row = static_cast<char*>(p.out) + int64_t(t) * p.out_row_stride * 2;
      // Two rows and no bias (every token of a 2-rank run that reaches both ranks): both rows' vectors are
      // requested before any is summed, and no accumulator lives across them, so twice the loads are in
      // flight in fewer registers. The sum is the oracle's: (0 + first row) + second row, rounded once.
      const bool pair =
          kPairUnroll > 0 && __popcll(mask) == 2 && p.bias0.data == nullptr && p.bias1.data == nullptr;
      if (pair) {
        const int d0 = __ffsll(mask) - 1, d1 = __ffsll(mask & (mask - 1)) - 1;
        const int4* a =
            reinterpret_cast<const int4*>(row_of(d0, __shfl_sync(~0u, d0 < 32 ? pos_lo : pos_hi, d0 & 31)));
        const int4* b =
            reinterpret_cast<const int4*>(row_of(d1, __shfl_sync(~0u, d1 < 32 ? pos_lo : pos_hi, d1 & 31)));
        for (int64_t v0 = 0; v0 < vecs; v0 += 32 * kPairUnroll) {
          // Zeroed: a guarded load leaves no value to carry over from the last iteration (else spilled).
          int4 va[kPairUnroll > 0 ? kPairUnroll : 1] = {}, vb[kPairUnroll > 0 ? kPairUnroll : 1] = {};
#pragma unroll
          for (int u = 0; u < kPairUnroll; ++u) {
            const int64_t v = v0 + u * 32 + lane;
            if (v < vecs) {
              va[u] = __ldcg(a + v);
              vb[u] = __ldcg(b + v);
            }
          }
#pragma unroll
          for (int u = 0; u < kPairUnroll; ++u) {
            const int64_t v = v0 + u * 32 + lane;
            if (v < vecs) {
              float acc[8] = {};
              add_bf16x8(acc, va[u]);
              add_bf16x8(acc, vb[u]);
              reinterpret_cast<int4*>(out_row)[v] = to_bf16x8(acc);
            }
          }
        }
      }
      // kUnroll vectors per lane in flight from every source row before any is summed; the trip count
      // is uniform over the warp (the shuffles need every lane).
      constexpr int kUnroll = EXPERTLINK_HT_REDUCE_UNROLL;
      for (int64_t v0 = 0; v0 < (pair ? 0 : vecs); v0 += 32 * kUnroll) {
        float acc[kUnroll][8] = {};
        auto accumulate = [&](const int4* base, bool local) {
          int4 val[kUnroll] = {};  // see va above
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t v = v0 + u * 32 + lane;
            if (v < vecs) val[u] = local ? ld_nc_v4(base + v) : __ldcg(base + v);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (v0 + u * 32 + lane < vecs) add_bf16x8(acc[u], val[u]);
        };
        for (uint64_t m = mask; m != 0; m &= m - 1) {
          const int d = __ffsll(m) - 1;
          const int pos = __shfl_sync(~0u, d < 32 ? pos_lo : pos_hi, d & 31);
          accumulate(reinterpret_cast<const int4*>(row_of(d, pos)), d == me);
        }
        if (p.bias0.data != nullptr)
          accumulate(reinterpret_cast<const int4*>(static_cast<const char*>(p.bias0.data) +
                                                   t * p.bias0.row_stride * 2),
                     true);
        if (p.bias1.data != nullptr)
          accumulate(reinterpret_cast<const int4*>(static_cast<const char*>(p.bias1.data) +
                                                   t * p.bias1.row_stride * 2),
                     true);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = v0 + u * 32 + lane;
          if (v < vecs) reinterpret_cast<int4*>(out_row)[v] = to_bf16x8(acc[u]);
        }
      }
      if (!kPull && p.out_topk_weights != nullptr) {  // requires topk_weights (checked on the host)
        float sum = 0.f;  // rank ascending from 0, as the oracle sums (pull: sum_pulled_weights)
        for (uint64_t m = mask; m != 0; m &= m - 1) {
          const int d = __ffsll(m) - 1;
          const int pos = __shfl_sync(~0u, d < 32 ? pos_lo : pos_hi, d & 31);
          if (lane < K) {
            if (d == me)
              sum += static_cast<const float*>(
                  p.topk_weights.data)[(local_row0 + pos) * p.topk_weights.row_stride +
                                       lane * p.topk_weights.col_stride];
            else
              sum += __ldcg(reinterpret_cast<const float*>(row_of(d, pos) + 2ll * H) + lane);
          }
        }
        if (lane < K) p.out_topk_weights[int64_t(t) * K + lane] = sum;
      }
      t = __shfl_sync(~0u, next, 0);
    }
    if (warp == S && lane == 0 && k >= 0) ht_stamp(p.trace, k, kHtRecvDone);
  };

  // Pull with top-k weights: every token's summed weights in one pass after the rows, over all the grid's
  // threads (thread i sums item i = (token, k), kBatch items at once so their loads are in flight together),
  // instead of one NVLink round trip after each token's rows in its warp (+31 us at 8 SMs, +6 at 24, 2x H200,
  // 2026-11-28: the reduce is latency-bound). Each peer d's weights are staged in its window, one [K] row per
  // receive-region row (ht_stage_weights_kernel), readable from the start (its "ready"); this rank's are the
  // caller's topk_weights. Summed rank ascending from 0, as the oracle does.
  auto sum_pulled_weights = [&]() {
    constexpr int kBatch = 8;
    const int64_t items = int64_t(T) * K, stride = int64_t(gridDim.x) * kThreads;
    const int64_t local_row0 = p.handle.rank_prefix[me];
    for (int64_t i0 = int64_t(blockIdx.x) * kThreads + threadIdx.x; i0 < items; i0 += kBatch * stride) {
      float sum[kBatch] = {};
      for (int d = 0; d < R; ++d) {
        if (!rank_live(w, d)) continue;
        int pos[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int64_t i = i0 + b * stride;
          pos[b] = i < items ? p.handle.send_pos[(i / K) * R + d] : -1;
        }
        float v[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int k = static_cast<int>((i0 + b * stride) % K);
          if (pos[b] < 0)
            v[b] = 0.f;
          else if (d == me)
            v[b] = static_cast<const float*>(
                p.topk_weights
                    .data)[(local_row0 + pos[b]) * p.topk_weights.row_stride + k * p.topk_weights.col_stride];
          else  // d's row in its receive region
            v[b] = __ldcg(staged_weights(w.peer_base[d], p) +
                          direct_row(p, p.handle.dest_row0[d], pos[b]) * K + k);
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b)
          if (pos[b] >= 0) sum[b] += v[b];
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (i0 + b * stride < items) p.out_topk_weights[i0 + b * stride] = sum[b];
    }
  };

  if (warp < S) {
    // ---- send (warps [0, S)): source s's chunk c of expert outputs back into s's area ----
    const int items = source_chunk_items(w, p.handle.src_tokens);
    for (int k = 0, mine = 0;; ++k) {  // tickets drawn; items of a live source this block published
      const int item = ticket[k & 1];
      if (item >= items) break;
      const SourceChunk sc = source_chunk(w, p.handle.src_tokens, item);
      const int s = sc.source, c = sc.chunk, m = mine;
      if (sc.valid) {
        ++mine;
        if (threadIdx.x == 0) ht_stamp(p.trace, m, kHtSendStart);
        const int32_t* chunk_prefix = p.handle.chunk_prefix + s * (kMaxChunks + 1);
        const int r0 = chunk_prefix[c], r1 = chunk_prefix[c + 1];
        if (r0 < r1) {
          if (threadIdx.x == 0) send_abort = !peer_ready_same_mode(s);
          role_barrier(kSendBarrier, S);
          if (send_abort) break;
          const int64_t row0 = p.handle.rank_prefix[s];
          char* seg = area_segment(w.peer_base[s], p.area_offset, me, s, p.area_rows, p.record_bytes);
          for (int r = r0 + warp; r < r1; r += S) {
            const int64_t row = row0 + r;
            char* rec = seg + int64_t(r) * p.record_bytes;
            const char* src = static_cast<const char*>(p.x.data) + row * p.x.row_stride * 2;
            if constexpr (kBulk) {
              if (!warp_bulk_send(src, 2ll * H, 1, rec, nullptr, stages, lane, ctx)) {
                copy_abort = 1;
                break;
              }
            } else {
              warp_copy_row<true>(reinterpret_cast<const int4*>(src), reinterpret_cast<int4*>(rec), vecs,
                                  lane);
            }
            if (with_weights && lane < K)
              reinterpret_cast<float*>(rec + 2ll * H)[lane] = static_cast<const float*>(
                  p.topk_weights.data)[row * p.topk_weights.row_stride + lane * p.topk_weights.col_stride];
          }
        }
        if (kBulk && lane == 0) bulk_wait_all();
      }
      if (threadIdx.x == 0) ticket[(k + 1) & 1] = draw_ticket(p.state, 2, kSendRole);
      // The item's rows from every sender warp (and the next ticket), then one release store (publish_chunk),
      // also for an item with no rows: s's reduce waits for every rank's flag of each chunk.
      role_barrier(kSendBarrier, S);
      if (kBulk && copy_abort) break;
      if (sc.valid && threadIdx.x == 0) {
        ht_stamp(p.trace, m, kHtSendIssued);
        publish_chunk<kBulk>(control_u64(w.peer_base[s], control::kCombineChunk, me * kMaxChunks + c), round);
        ht_stamp(p.trace, m, kHtSendPublished);
      }
    }
    // The block's rows are all sent: its sending warps join the reduce, so the reduce's tail after the
    // last rows arrive runs on every warp of the block.
    if (!send_abort && !(kBulk && copy_abort)) reduce_tokens();
  } else {
    reduce_tokens();
    if (kPull && p.out_topk_weights != nullptr) sum_pulled_weights();
  }
  if (finish_round<kPull>(p.state, 2, round) && kPull) {
    // Every block's reads of the peers' regions are done (each block fenced before counting itself): tell
    // every peer, whose next direct dispatch overwrites its region only then; and remember the round.
    if (threadIdx.x < R && threadIdx.x != me && rank_live(w, threadIdx.x))
      st_release_sys(control_u64(w.peer_base[threadIdx.x], control::kCombineDone, me), round);
    if (threadIdx.x == 0) p.state.rounds[3] = round;
  }
}

// Direct combine with top-k weights: the peers read this rank's weights of the rows it holds from its
// window, so they are copied there first (staged_weights). The previous direct combine's readers must be done
// with them (their "done reading" words, as direct dispatch waits for them); the combine kernel, launched
// after this one, announces "ready" only when it starts, so no peer reads before the copy is complete.
__global__ void ht_stage_weights_kernel(HtCombineParams p, int64_t rows) {
  __shared__ int abort_flag;
  const SymmetricView& w = p.win;
  const int me = w.rank, K = p.topk;
  const WaitContext ctx{w.record, w.timeout_ns, me};
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  if (!wait_direct_readers_done(w, p.state, ctx))
    abort_flag = 1;  // recorded: the combine kernel (wait_aborted) and the host report it
  __syncthreads();
  if (abort_flag) return;
  float* staged = staged_weights(w.local_base, p);
  const float* src = static_cast<const float*>(p.topk_weights.data);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * K;
       i += gridDim.x * int64_t(blockDim.x)) {
    const int64_t r = i / K, k = i % K;
    staged[i] = src[r * p.topk_weights.row_stride + k * p.topk_weights.col_stride];
  }
}

// Pull has no sending half, so no bulk instance: the warp-copy kernel serves both.
template <int kThreads>
void launch_pull(const HtCombineParams& q, int num_sms, cudaStream_t stream) {
  launch_ht_kernel(ht_combine_kernel<false, kThreads, true>, ht_combine_kernel<false, kThreads, true>, q,
                   num_sms, stream, kThreads);
}
template <int kThreads>
void launch_push(const HtCombineParams& q, int num_sms, cudaStream_t stream) {
  launch_ht_kernel(ht_combine_kernel<true, kThreads, false>, ht_combine_kernel<false, kThreads, false>, q,
                   num_sms, stream, kThreads);
}

}  // namespace

void launch_ht_stage_weights(const HtCombineParams& p, int64_t rows, cudaStream_t stream) {
  const int threads = 256;
  const int64_t n = rows * p.topk;
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 132)));
  ht_stage_weights_kernel<<<blocks, threads, 0, stream>>>(p, rows);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_ht_combine(const HtCombineParams& p, int num_sms, cudaStream_t stream) {
  HtCombineParams q = p;
  q.trace = ht_trace_arm(HtTraceKind::kCombine, num_sms, stream);
  const bool few = num_sms <= kFewSms;
  if (q.direct_offset >= 0)
    few ? launch_pull<kPullThreadsFew>(q, num_sms, stream)
        : launch_pull<kCombineThreadsMany>(q, num_sms, stream);
  else
    few ? launch_push<kCombineThreadsFew>(q, num_sms, stream)
        : launch_push<kCombineThreadsMany>(q, num_sms, stream);
}

}  // namespace expertlink::kernels
