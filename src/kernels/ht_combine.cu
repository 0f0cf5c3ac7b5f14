// HT combine: expert outputs go back to their source ranks and are summed per token in float32, in
// ascending rank order (the oracle's order). Protocol and buffer layout: ht_protocol.cuh.
#include <cstdlib>
#include <cstring>

#include "check.hpp"
#include "kernels/ht_protocol.cuh"

namespace expertlink::kernels {
namespace {

// Bulk reduce (the default; EXPERTLINK_HT_REDUCE=warp selects the register path): the reduce is bound by
// the loads it has in flight, and with 1024 threads a thread has 64 registers: 4 vectors of 16 bytes per
// lane, 32 KB per SM. Staging the rows in shared memory with bulk (TMA) loads takes the bytes in flight out
// of the registers: each reducing warp keeps kReduceStages pieces of kReducePieceBytes in flight (lane 0
// issues, every lane sums its 4 vectors of a piece from shared memory), 192 KB per SM. Measured on 2x H200
// (2026-11-28, T = 4096, H = 7168, work by tickets): combine 336 -> 316 us at 24 SMs, 674 -> 653 us at 8,
// far from the ~220 us predicted; alone (el_reduce_probe) bulk loads are slower than the register path,
// so the gain comes from sharing the SM with the sending half (docs/ht_performance.md).
// Bulk sending (EXPERTLINK_HT_COPY=bulk) needs the same shared memory: with it, combine reduces with warps.
inline constexpr int kReducePieceBytes = 32 * 4 * 16;
inline constexpr int kReduceStages = 6;
inline constexpr int kMaxBulkReduceWarps = 18;  // 216 KB of stages
inline size_t reduce_smem_bytes(int send_warps) {
  return size_t(kHtThreads / 32 - send_warps) * kReduceStages * kReducePieceBytes;
}

template <bool kBulk, bool kBulkReduce>
__global__ void __launch_bounds__(kHtThreads, 1) ht_combine_kernel(HtCombineParams p) {
  static_assert(!(kBulk && kBulkReduce), "bulk sending and bulk reducing share the dynamic shared memory");
  __shared__ int abort_flag, send_abort, copy_abort;
  __shared__ int ticket[2];  // [parity]: the sending half's current and next item (draw_ticket)
  __shared__ uint32_t chunk_seen[kMaxChunks / 32];  // chunks whose rows have all arrived (reduce_tokens)
  __shared__ uint64_t stage_bar[kRoleWarps][2];
  __shared__ uint64_t reduce_bar[kBulkReduce ? kMaxBulkReduceWarps : 1][kReduceStages];
  extern __shared__ __align__(128) char stage_smem[];
  const SymmetricView& w = p.win;
  const int me = w.rank, R = w.num_ranks, T = p.num_tokens, K = p.topk, H = p.hidden;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int S = p.send_warps;  // warps [0, S) send, then join the reduce; warps [S, 32) reduce
  const uint64_t round = p.state.rounds[2] + 1;
  const WaitContext ctx{w.record, w.timeout_ns, me};
  const int64_t vecs = 2ll * H / 16;
  const bool with_weights = p.topk_weights.data != nullptr;

  if (blockIdx.x == 0 && threadIdx.x < R && threadIdx.x != me && rank_live(w, threadIdx.x))
    st_release_sys(control_u64(w.peer_base[threadIdx.x], control::kCombineReady, me), round);
  if (threadIdx.x == 0) {
    abort_flag = wait_aborted(ctx);
    send_abort = copy_abort = 0;
    ticket[0] = draw_ticket(p.state, 2, kSendRole);
  }
  if (threadIdx.x < kMaxChunks / 32) chunk_seen[threadIdx.x] = 0;
  WarpStages stages{};
  if (kBulk && warp < kRoleWarps) stages = warp_stages(stage_smem, stage_bar, warp, lane);
  if (kBulkReduce && warp >= S && lane == 0)
    for (int i = 0; i < kReduceStages; ++i) mbar_init(&reduce_bar[warp - S][i]);
  __syncthreads();
  if (abort_flag) return;

  // kPath: 0 the register path with 4 vectors per lane in flight, 1 the same with 2 (the sending warps
  // joining: fewer registers for the kernel as a whole), 2 the bulk path through the warp's stages.
  auto reduce_tokens = [&](auto path_tag) {
    constexpr int kPath = decltype(path_tag)::value;
    constexpr bool kB = kPath == 2;
    // ---- reduce: token by token. Each reducing warp draws its own tokens (tickets, in token order) and
    // waits for every rank's flag of the token's chunk itself, so no warp waits for the others: the
    // slowest of 16 warps no longer sets the pace of each chunk (el_reduce_probe: the reduce alone runs
    // in about half the time it takes inside this kernel). Trace stamps: reducing warp 0's view. ----
    const int chunk_tokens = ht_chunk_tokens(T);
    const int64_t local_row0 = p.handle.rank_prefix[me];
    const int rwarp = warp - S;  // bulk: this warp's stages (reducing warps only)
    uint32_t reduce_units = 0;     // bulk reduce: units this warp has taken through its stages (stage phases)
    int ready_chunk = -1, k = -1;  // the chunk whose rows have all arrived; warp 0's stamped chunks
    int t = __shfl_sync(~0u, lane == 0 ? draw_ticket(p.state, 2, kRecvRole) : 0, 0);
    while (t < T) {
      const int next = lane == 0 ? draw_ticket(p.state, 2, kRecvRole) : 0;  // its latency overlaps the token
      // The token's positions are the handle's (not written by peers): requested before the flag's
      // acquire, so the two loads' latencies overlap.
      const int32_t* pos_row = p.handle.send_pos + int64_t(t) * R;
      const int pos_lo = lane < R ? pos_row[lane] : -1, pos_hi = lane + 32 < R ? pos_row[lane + 32] : -1;
      const int c = t / chunk_tokens;
      if (c != ready_chunk) {
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
                          WaitSite::kHtCombineChunk, d, c))
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
        // The peers' rows were written through the generic proxy; the bulk loads read through the async one.
        if (kB && lane == 0) asm volatile("fence.proxy.async.global;" ::: "memory");
      }
      {
        const uint64_t mask = (static_cast<uint64_t>(__ballot_sync(~0u, pos_lo >= 0)) |
                               (static_cast<uint64_t>(__ballot_sync(~0u, pos_hi >= 0)) << 32)) &
                              ~w.masked;
        // Rows of token t, rank ascending: the local one in place, the others from the combine area.
        auto row_of = [&](int d, int pos) -> const char* {
          if (d == me) return static_cast<const char*>(p.x.data) + (local_row0 + pos) * p.x.row_stride * 2;
          return area_segment(w.local_base, p.area_offset, d, me, p.area_rows, p.record_bytes) +
                 int64_t(pos) * p.record_bytes;
        };
        char* out_row = static_cast<char*>(p.out) + int64_t(t) * p.out_row_stride * 2;
        if constexpr (kB) {
          // Sources in the oracle's order: the ranks of `mask` ascending, then bias0, then bias1. Unit u is
          // piece u / n_src of source u % n_src; units go through the warp's stages in order.
          const int n_rank = __popcll(mask);
          const int n_src = n_rank + (p.bias0.data != nullptr) + (p.bias1.data != nullptr);
          const int64_t row_bytes = 2ll * H;
          const int pieces = static_cast<int>((row_bytes + kReducePieceBytes - 1) / kReducePieceBytes);
          const int units = pieces * n_src;
          char* const stage_buf = stage_smem + size_t(rwarp) * kReduceStages * kReducePieceBytes;
          uint64_t* const bars = reduce_bar[kBulkReduce ? rwarp : 0];
          // Called by the whole warp (the shuffle); lane 0 issues the load of unit u into its stage.
          auto issue = [&](int u) {
            const int piece = u / n_src, i = u % n_src;
            const char* row;
            if (i < n_rank) {
              uint64_t m = mask;
              for (int skip = 0; skip < i; ++skip) m &= m - 1;
              const int d = __ffsll(m) - 1;
              row = row_of(d, __shfl_sync(~0u, d < 32 ? pos_lo : pos_hi, d & 31));
            } else {
              const Strided2d& b = i == n_rank && p.bias0.data != nullptr ? p.bias0 : p.bias1;
              row = static_cast<const char*>(b.data) + t * b.row_stride * 2;
            }
            const int64_t off = int64_t(piece) * kReducePieceBytes;
            const uint32_t slot = (reduce_units + u) % kReduceStages;
            if (lane == 0) {
              // The stage's previous unit was read by every lane through the generic proxy, and every lane
              // has used what it read (the sums) before the __syncwarp that precedes this issue, so the
              // bulk write cannot pass those reads: no proxy fence per unit (as TMA pipelines release a
              // stage with an mbarrier arrive alone).
              bulk_load(stage_buf + slot * kReducePieceBytes, row + off,
                        static_cast<uint32_t>(min(int64_t(kReducePieceBytes), row_bytes - off)), &bars[slot]);
            }
          };
          for (int u = 0; u < min(units, kReduceStages); ++u) issue(u);
          bool ok = true;
          for (int piece = 0; piece < pieces && ok; ++piece) {
            float acc[4][8] = {};
            for (int i = 0; i < n_src; ++i) {
              const int u = piece * n_src + i;
              const uint32_t g = reduce_units + u;
              if (!mbar_wait(&bars[g % kReduceStages], (g / kReduceStages) & 1, ctx)) {
                ok = false;
                break;
              }
              const int4* piece_smem =
                  reinterpret_cast<const int4*>(stage_buf + (g % kReduceStages) * kReducePieceBytes);
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const int64_t v = int64_t(piece) * (kReducePieceBytes / 16) + j * 32 + lane;
                if (v < vecs) add_bf16x8(acc[j], piece_smem[j * 32 + lane]);
              }
              __syncwarp();
              if (u + kReduceStages < units) issue(u + kReduceStages);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const int64_t v = int64_t(piece) * (kReducePieceBytes / 16) + j * 32 + lane;
              if (ok && v < vecs) reinterpret_cast<int4*>(out_row)[v] = to_bf16x8(acc[j]);
            }
          }
          reduce_units += units;
          if (!ok) break;  // recorded by mbar_wait
        }
        // kUnroll vectors per lane in flight from every source row before any is summed; the trip count
        // is uniform over the warp (the shuffles need every lane).
        constexpr int kUnroll = kPath == 1 ? 2 : 4;
        for (int64_t v0 = 0; v0 < (kB ? 0 : vecs); v0 += 32 * kUnroll) {
          float acc[kUnroll][8] = {};
          auto accumulate = [&](const int4* base, bool local) {
            int4 val[kUnroll];
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
        if (p.out_topk_weights != nullptr) {  // requires topk_weights (checked on the host)
          float sum = 0.f;
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
      }
      t = __shfl_sync(~0u, next, 0);
    }
    if (warp == S && lane == 0 && k >= 0) ht_stamp(p.trace, k, kHtRecvDone);

  };

  if (warp < S) {
    // ---- send (first half of the warps): source s's chunk c of expert outputs back into s's area ----
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
          if (threadIdx.x == 0)
            send_abort = !wait_geq(control_u64(w.local_base, control::kCombineReady, s), round, ctx,
                                   WaitSite::kHtCombineReady, s, 0);
          role_barrier(kSendBarrier, S * 32);
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
      // The item's rows from every sender warp (and the next ticket), then one fenced release store, also
      // for an item with no rows: s's reduce waits for every rank's flag of each chunk.
      role_barrier(kSendBarrier, S * 32);
      if (kBulk && copy_abort) break;
      if (sc.valid && threadIdx.x == 0) {
        ht_stamp(p.trace, m, kHtSendIssued);
        __threadfence_system();
        st_release_sys(control_u64(w.peer_base[s], control::kCombineChunk, me * kMaxChunks + c), round);
        ht_stamp(p.trace, m, kHtSendPublished);
      }
    }
    // The block's rows are all sent: its sending warps join the reduce (register path; the shared-memory
    // stages belong to the reducing warps), so the reduce's tail after the last rows arrive runs on every
    // warp of the block instead of half of them.
    if (!send_abort && !(kBulk && copy_abort)) reduce_tokens(std::integral_constant<int, 1>{});
  } else {
    reduce_tokens(std::integral_constant<int, kBulkReduce ? 2 : 0>{});
  }
  finish_round(p.state, 2, round);
}

}  // namespace

bool ht_bulk_reduce() {
  const char* v = std::getenv("EXPERTLINK_HT_REDUCE");
  return v == nullptr || std::strcmp(v, "warp") != 0;
}

// Warps of a combine block that send before they join the reduce (the others reduce from the start).
// EXPERTLINK_HT_COMBINE_SENDERS (diagnostics) sets it: 1..31 with the register reduce, 14..31 with the
// bulk one (its stages take 12 KB of shared memory per reducing warp); bulk sending needs 16.
int ht_combine_send_warps(bool bulk_reduce) {
  const char* v = std::getenv("EXPERTLINK_HT_COMBINE_SENDERS");
  if (v == nullptr || ht_bulk_send()) return kRoleWarps;
  const int n = std::atoi(v), lo = bulk_reduce ? kHtThreads / 32 - kMaxBulkReduceWarps : 1;
  EL_CHECK(n >= lo && n < kHtThreads / 32, "EXPERTLINK_HT_COMBINE_SENDERS=%s: must be %d..%d with the %s reduce", v,
           lo, kHtThreads / 32 - 1, bulk_reduce ? "bulk" : "register");
  return n;
}

void launch_ht_combine(const HtCombineParams& p, int num_sms, cudaStream_t stream) {
  HtCombineParams q = p;
  q.trace = ht_trace_arm(HtTraceKind::kCombine, num_sms, stream);
  const bool bulk_reduce = ht_bulk_reduce();
  q.send_warps = ht_combine_send_warps(bulk_reduce);
  if (!bulk_reduce) {
    launch_ht_kernel(ht_combine_kernel<true, false>, ht_combine_kernel<false, false>, q, num_sms, stream);
    return;
  }
  // Per device; not a stream operation, so legal during graph capture. Bulk reducing sends with warps.
  const size_t smem = reduce_smem_bytes(q.send_warps);
  EL_CUDA_CHECK(cudaFuncSetAttribute(ht_combine_kernel<false, true>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  ht_combine_kernel<false, true><<<num_sms, kHtThreads, smem, stream>>>(q);
  EL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace expertlink::kernels
