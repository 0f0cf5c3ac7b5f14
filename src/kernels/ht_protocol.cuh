// The high-throughput (HT) intranode protocol: buffer layout and the helpers its kernels share.
//
// Notify (one block): each rank scans its routing, finds for every token the position among the rows it
// sends to each rank d (send_pos, in token order), writes a meta record into d's window (its T, the rows
// it sends d, per token-chunk counts, per local-expert counts) and publishes it with a release store of
// the notify round. It then waits (bounded) for every rank's record and derives where each source's rows
// land (rank_prefix, chunk_prefix) and the per-expert counts.
//
// Dispatch (S blocks, each split into a sending and a receiving half): a rank's tokens are cut into
// chunks (ht_chunk_tokens(T)), which the sending halves take by ticket (draw_ticket), as the receiving
// halves take the (source, chunk) items. The sending half that drew chunk c reads each token row once and
// writes it straight into every destination: into its own recv_x at its final row when the destination
// is itself, else into the destination's receiving area (one segment per source rank, rows at send_pos).
// When the chunk is written, it publishes round r in the destination's kDispatchChunk[src][c] slot (role
// barrier, system fence, release store). Meanwhile the receiving halves wait for each (source, chunk)
// slot and copy those rows out to recv_x at rank_prefix[src] + position. Before a sender writes into rank
// d's area it waits for d's kDispatchReady >= r: d has started round r, so its round r - 1 copy-out is
// over (stream order).
//
// Combine (S blocks, same split) reverses it: the sending halves write the expert outputs of source s,
// chunk c into s's combine area (same positions) and publish kCombineChunk[me][c]; the receiving halves
// of rank s sum, for each token of a chunk whose rows have all arrived, the rows from every rank in
// ascending rank order (its own rows read in place) in float32 - the oracle's order, so the result is
// bitwise the oracle's.
//
// Receiving area of rank d, per call (all ranks derive the same numbers from the same arguments):
//   data region = [dispatch area | combine area], halves; each area holds R - 1 segments (one per other
//   source rank, s's index = s < d ? s : s - 1) of area_rows records of record_bytes.
//   dispatch record: [row data][scales][topk ids: K x i32, remapped to d's local experts][weights K x f32]
//                    [source token: i32], padded to 128 bytes
//   combine record:  [BF16 row][weights K x f32], padded to 128 bytes
#pragma once

#include <cstdint>

#include "check.hpp"

#include "comm/control_layout.hpp"
#include "kernels/bulk_copy.cuh"
#include "kernels/ht_kernels.hpp"
#include "kernels/pdl.hpp"
#include "kernels/sync.cuh"
#include "kernels/vector_io.cuh"

namespace expertlink::kernels {

// 32 warps: bytes in flight per SM (warps x lanes x unrolled 16-byte loads) set the copy rate.
inline constexpr int kHtThreads = 1024;
// Dispatch and combine split each block in two roles: warps [0, S) send, the others receive (copy-out /
// reduce), so that receiving overlaps sending instead of following it; each kernel sets its S (combine's
// senders join the reduce when they are done). Each role synchronizes on its own named barrier.
inline constexpr int kSendBarrier = 1, kRecvBarrier = 2;
// Bulk sending (EXPERTLINK_HT_COPY=bulk) has shared-memory stages for this many sending warps.
inline constexpr int kBulkSendWarps = 16;

__device__ __forceinline__ void role_barrier(int id, int warps) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(warps * 32) : "memory");
}

// EXPERTLINK_HT_TRACE: the calling thread stamps `point` of its block's k-th chunk (sending) or item
// (receiving). Compiled in only with the build option EXPERTLINK_HT_TRACE=ON.
__device__ __forceinline__ void ht_stamp(uint64_t* trace, int k, int point) {
#ifdef EXPERTLINK_HT_TRACE_STAMPS
  if (trace != nullptr && k < kMaxChunks)
    trace[(static_cast<int64_t>(blockIdx.x) * kMaxChunks + k) * kHtTracePoints + point] = global_timer_ns();
#else
  (void)trace;
  (void)k;
  (void)point;
#endif
}

__device__ __forceinline__ uint64_t* control_u64(char* window, size_t offset, int index) {
  return reinterpret_cast<uint64_t*>(window + offset) + index;
}

__device__ __forceinline__ int32_t* meta_record(char* window, uint64_t round, int src) {
  return reinterpret_cast<int32_t*>(window + control::kMeta) +
         (static_cast<int64_t>(round & 1) * kMaxRanks + src) * control::kMetaInts;
}

// Segment of source `src` in rank `dst`'s area (window base `window` of dst).
__device__ __forceinline__ char* area_segment(char* window, int64_t area_offset, int src, int dst,
                                              int64_t area_rows, int64_t record_bytes) {
  int slot = src < dst ? src : src - 1;
  return window + kControlBytes + area_offset + slot * area_rows * record_bytes;
}

// Row copy by one warp, 16-byte vectors, kCopyUnroll loads in flight per lane before the stores.
// kInputRow: the non-coherent path for inputs that do not change during the kernel; otherwise L2-only
// (.cg) loads, for rows a peer wrote into this rank's window.
constexpr int kCopyUnroll = 8;

template <bool kInputRow>
__device__ __forceinline__ int4 load_vec(const int4* p) {
  if constexpr (kInputRow)
    return ld_nc_v4(p);
  else
    return __ldcg(p);
}

template <bool kInputRow>
__device__ __forceinline__ void warp_copy_row(const int4* __restrict__ src, int4* __restrict__ dst,
                                              int64_t vecs, int lane) {
  for (int64_t v0 = lane; v0 < vecs; v0 += 32 * kCopyUnroll) {
    int4 val[kCopyUnroll] = {};  // zeroed: a guarded load then carries no value across iterations
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (v0 + u * 32 < vecs) val[u] = load_vec<kInputRow>(src + v0 + u * 32);
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (v0 + u * 32 < vecs) dst[v0 + u * 32] = val[u];
  }
}

// Bulk-copy sending (dispatch and combine): each sending warp stages rows through shared memory in pieces
// of kStageBytes, two stages per warp, so the load of piece n + 1 overlaps the stores of piece n; lane 0
// issues the copies. The sending half's stages fill the dynamic shared memory of the block.
inline constexpr int kStageBytes = 6144;
inline constexpr size_t kBulkSmemBytes = size_t(kBulkSendWarps) * 2 * kStageBytes;

struct WarpStages {
  char* buf;       // 2 x kStageBytes
  uint64_t* bar;   // 2 mbarriers
  uint32_t piece;  // pieces staged so far: stage = piece & 1, phase = (piece >> 1) & 1
};

// Sets up sending warp `warp`'s stages (lane 0 initialises the mbarriers; a block barrier must follow
// before first use).
__device__ __forceinline__ WarpStages warp_stages(char* smem, uint64_t (*bars)[2], int warp, int lane) {
  if (lane == 0) {
    mbar_init(&bars[warp][0]);
    mbar_init(&bars[warp][1]);
  }
  return WarpStages{smem + size_t(warp) * 2 * kStageBytes, bars[warp], 0};
}

// Copies `bytes` from `src` to every destination d in `mask` (lane d holds d's address in dst_lo, lane
// d - 32 in dst_hi; null = skip) through the warp's stages. Called by the whole warp. The stores are only
// issued: bulk_wait_all (lane 0) before publishing them. False (recorded) if a load timed out.
__device__ __forceinline__ bool warp_bulk_send(const char* src, int64_t bytes, uint64_t mask, char* dst_lo,
                                               char* dst_hi, WarpStages& st, int lane,
                                               const WaitContext& ctx) {
  for (int64_t off = 0; off < bytes; off += kStageBytes, ++st.piece) {
    const int stage = st.piece & 1;
    const uint32_t n = static_cast<uint32_t>(min(int64_t(kStageBytes), bytes - off));
    char* buf = st.buf + stage * kStageBytes;
    bool ok = true;
    if (lane == 0) {
      bulk_wait_read<1>();  // the stores of piece - 2 (same stage) have read it
      bulk_load(buf, src + off, n, &st.bar[stage]);
      ok = mbar_wait(&st.bar[stage], (st.piece >> 1) & 1, ctx);
    }
    if (!__shfl_sync(~0u, ok, 0)) return false;
    for (uint64_t m = mask; m != 0; m &= m - 1) {
      const int d = __ffsll(m) - 1;
      char* dst = reinterpret_cast<char*>(
          __shfl_sync(~0u, reinterpret_cast<uintptr_t>(d < 32 ? dst_lo : dst_hi), d & 31));
      if (lane == 0 && dst != nullptr) bulk_store(dst + off, buf, n);
    }
    if (lane == 0) bulk_commit();
  }
  return true;
}

// Warp-copy sending is the default; EXPERTLINK_HT_COPY=bulk selects bulk (TMA) sending. Measured on 2x H200
// (2026-11-28, BF16 T=4096 H=7168, 24 SMs): bulk dispatch 321-327 us vs warp 286-288, combine 369-370 vs
// 355-357, so bulk stays an option (docs/ht_performance.md).
bool ht_bulk_send();

// Launches kernel<true> (bulk sending, kBulkSmemBytes of dynamic shared memory) or kernel<false>, as a
// dependent launch (kernels/pdl.hpp: the kernel waits for the previous stream work before anything else).
template <class Params>
void launch_ht_kernel(void (*bulk)(Params), void (*warp)(Params), const Params& p, int blocks,
                      cudaStream_t stream, int threads = kHtThreads) {
  if (ht_bulk_send()) {
    // Per device; not a stream operation, so legal during graph capture.
    EL_CUDA_CHECK(cudaFuncSetAttribute(bulk, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kBulkSmemBytes)));
    launch_dependent(bulk, p, blocks, threads, kBulkSmemBytes, stream);
  } else {
    launch_dependent(warp, p, blocks, threads, 0, stream);
  }
}

// Work is dealt by tickets, not round robin: each role of a kernel draws the index of its next chunk or
// item from its own counter, so a block whose SM moves bytes faster takes more of them (on 2x H200 blocks
// with equal shares finished their rows 1.4-1.6x apart: the trace of 2026-11-28). One thread of the role
// draws, the role barrier that ends the current item publishes the draw, so the atomic's latency hides
// behind the other warps' last rows.
inline constexpr int kSendRole = 0, kRecvRole = 1;
__device__ __forceinline__ int draw_ticket(const HtState& st, int which, int role) {
  return static_cast<int>(atomicAdd(&st.tickets[2 * which + role], 1u));
}

// A chunk's flag, once the block's sending warps have written its rows (a role barrier or the step counter
// orders their stores before the calling thread): a release store at system scope, which is cumulative
// over those stores. EXPERTLINK_HT_PUBLISH_FENCE=1 (a build option) puts a full system fence before it,
// as at 05a0df0, where the SASS had MEMBAR.SC.SYS and the store's MEMBAR.ALL.SYS back to back and the
// phase trace put the publishing at ~30 % of the sending time (28-33 us of ~100 per block at 24 SMs).
// Bulk (TMA) stores are another proxy's writes: after them the full fence stays (kAfterBulk).
#ifndef EXPERTLINK_HT_PUBLISH_FENCE
#define EXPERTLINK_HT_PUBLISH_FENCE 0
#endif
template <bool kAfterBulk>
__device__ __forceinline__ void publish_chunk(uint64_t* flag, uint64_t round) {
  if (kAfterBulk || EXPERTLINK_HT_PUBLISH_FENCE) __threadfence_system();
  st_release_sys(flag, round);
}

// Free-running sending warps: no barrier per chunk, so a warp with fewer of the chunk's rows goes on to
// the next chunk instead of idling (with 32-token chunks and 28 sending warps, 4 warps had two rows and
// 24 one). The block's k-th chunk is drawn by the first of its warps to reach step k: steps[k] is -1
// until then, -2 while that warp draws (the others wait one atomic's latency: the wait is bounded).
// steps has room for every chunk and the final draw past the last one.
struct SendSteps {
  int chunk[kMaxChunks + 1];
  int done[kMaxChunks + 1];  // warps done with step k
};
__device__ __forceinline__ void init_send_steps(SendSteps& s) {
  for (int i = threadIdx.x; i <= kMaxChunks; i += blockDim.x) {
    s.chunk[i] = -1;
    s.done[i] = 0;
  }
}
__device__ __forceinline__ int warp_step_chunk(SendSteps& s, int k, const HtState& st, int which, int lane) {
  int c = 0;
  if (lane == 0) {
    volatile int* slot = s.chunk + k;
    c = *slot;
    if (c == -1 && atomicCAS_block(s.chunk + k, -1, -2) == -1) {
      c = draw_ticket(st, which, kSendRole);
      *slot = c;
    } else {
      while (c < 0) c = *slot;
    }
  }
  return __shfl_sync(~0u, c, 0);
}
// The calling warp's rows of step k are written; true for the last of the block's `warps` sending warps,
// which then publishes the chunk: every lane of it is ordered after every sending warp's stores (each warp's
// __syncwarp and acquire-release increment, the last one's acquiring every earlier release, then
// __syncwarp), so the release store that publishes the chunk covers them. (CTA fences on either side of a
// relaxed increment, as at 05a0df0, measured the same on 2x H200, 2026-11-28.)
__device__ __forceinline__ bool warp_step_done(SendSteps& s, int k, int warps, int lane) {
  __syncwarp();
  int last = 0;
  if (lane == 0) {
    unsigned old;
    asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], 1;"
                 : "=r"(old)
                 : "r"(static_cast<unsigned>(__cvta_generic_to_shared(s.done + k)))
                 : "memory");
    last = old == static_cast<unsigned>(warps - 1);
  }
  last = __shfl_sync(~0u, last, 0);
  __syncwarp();
  return last != 0;
}

// Publisher warp (free-running blocks; EXPERTLINK_HT_PUBLISHER=0 turns it off): the chunk the block's
// sending warps drew for step k, returned once all `warps` of them are done with it (>= num_chunks: the
// steps are over; -1: timed out, recorded). Its lanes then publish the chunk, so no sending warp waits for
// a flag's fence. Lane 0's acquire of the count, then __syncwarp, orders every lane after the senders' rows
// (each sender's acquire-release increment releases them). Bounded like every wait, although the senders
// wait for nothing between steps: a timeout here is recorded as kHtSendSteps (peer = this rank).
__device__ __forceinline__ int publisher_step(SendSteps& s, int k, int warps, int num_chunks, int lane,
                                              const WaitContext& ctx) {
  int c = -1;
  if (lane == 0) {
    const uint64_t start = global_timer_ns();
    const volatile int* slot = s.chunk + k;
    uint32_t done = 0;
    for (uint32_t polls = 1;; ++polls) {
      if (c < 0) c = *slot;  // -1 not drawn yet, -2 being drawn
      if (c >= num_chunks) break;
      if (c >= 0) {
        asm volatile("ld.acquire.cta.shared::cta.u32 %0, [%1];"
                     : "=r"(done)
                     : "r"(static_cast<unsigned>(__cvta_generic_to_shared(s.done + k)))
                     : "memory");
        if (done == static_cast<uint32_t>(warps)) break;
      }
      if ((polls & 255u) == 0) {
        const uint64_t waited = global_timer_ns() - start;
        if (waited > ctx.timeout_ns) {
          record_timeout(ctx, WaitSite::kHtSendSteps, ctx.rank, k, static_cast<uint64_t>(warps), done,
                         waited);
          c = -1;
          break;
        }
      }
    }
  }
  c = __shfl_sync(~0u, c, 0);
  __syncwarp();
  return c;
}

// Dispatch and combine each start a round by telling every peer d (block 0, the thread of d) that this rank
// has started it, so its area may be written (push) or its rows read (direct): the mode word (2 x round,
// + 1 when direct) first, then the release of the ready signal. A peer then waits for the signal and checks
// that both ranks place or read the rows the same way: a disagreement is recorded as a kMismatch of
// argument `which` (3 dispatch, 4 combine; control_layout.hpp, wait_record.hpp).
__device__ __forceinline__ void announce_round(const SymmetricView& w, int d, size_t ready, size_t mode,
                                               uint64_t round, bool direct) {
  *control_u64(w.peer_base[d], mode, w.rank) = 2 * round + (direct ? 1 : 0);
  st_release_sys(control_u64(w.peer_base[d], ready, w.rank), round);
}
// Waits (bounded) for peer d's signal of `round`; false, recorded, on a timeout or a disagreement. The ready
// value is this round or, for a peer already a round ahead, the next: so is its mode word.
__device__ __forceinline__ bool wait_round_same_mode(const SymmetricView& w, int d, size_t ready, size_t mode,
                                                     uint64_t round, bool direct, const WaitContext& ctx,
                                                     WaitSite site, int which) {
  if (!wait_geq(control_u64(w.local_base, ready, d), round, ctx, site, d, 0)) return false;
  const uint64_t seen = ld_volatile(control_u64(w.local_base, mode, d));
  if (seen / 2 == round && (seen & 1) != (direct ? 1 : 0)) {
    record_timeout(ctx, WaitSite::kMismatch, d, which, direct ? 1 : 0, seen & 1, 0);
    return false;
  }
  return true;
}

// Whether the peer of the calling thread (thread d for peer d; every other thread: true at once) has
// finished reading this rank's window in its last direct combine (its "done reading" word >= rounds[3]),
// before anything there is overwritten: the receive region (direct dispatch) or the staged weights in the
// combine area (their next copy, or a push combine's rows). Bounded; a timeout is recorded.
__device__ __forceinline__ bool wait_direct_readers_done(const SymmetricView& w, const HtState& st,
                                                         const WaitContext& ctx) {
  const uint64_t pulled = st.rounds[3];
  const int d = threadIdx.x;
  if (pulled == 0 || d >= w.num_ranks || d == w.rank || !rank_live(w, d)) return true;
  return wait_geq(control_u64(w.local_base, control::kCombineDone, d), pulled, ctx, WaitSite::kHtCombineDone,
                  d, 0);
}

// The (source, chunk) items a rank receives (dispatch) or sends back (combine), chunk-major: the order
// in which the sources publish them. Item i is chunk i / (R - 1) of the (i % (R - 1))-th other rank;
// there are (R - 1) x (the most chunks of any live other source) items, and an item is empty (nothing to
// wait for) when its source is masked or has fewer chunks.
struct SourceChunk {
  int source, chunk;
  bool valid;
};
__device__ __forceinline__ int source_chunk_items(const SymmetricView& w, const int32_t* src_tokens) {
  int most = 0;
  for (int s = 0; s < w.num_ranks; ++s)
    if (s != w.rank && rank_live(w, s)) most = max(most, ht_num_chunks(src_tokens[s]));
  return (w.num_ranks - 1) * most;
}
__device__ __forceinline__ SourceChunk source_chunk(const SymmetricView& w, const int32_t* src_tokens,
                                                    int item) {
  const int j = item % (w.num_ranks - 1), s = j < w.rank ? j : j + 1, c = item / (w.num_ranks - 1);
  return {s, c, rank_live(w, s) && c < ht_num_chunks(src_tokens[s])};
}

// The last block of a kernel to finish advances the rank's round counter `which` (the next kernel on
// the stream reads it at entry; all blocks of this one read it before any could finish) and zeroes the
// kernel's tickets (every block has drawn its last). kTell: every thread learns whether its block was
// that last one (one more block barrier).
template <bool kTell = false>
__device__ __forceinline__ bool finish_round(const HtState& st, int which, uint64_t round) {
  __syncthreads();
  int last = 0;
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&st.done_blocks[which], 1u) == gridDim.x - 1) {
      st.rounds[which] = round;
      st.done_blocks[which] = 0;
      st.tickets[2 * which + kSendRole] = 0;
      st.tickets[2 * which + kRecvRole] = 0;
      __threadfence();
      last = 1;
    }
  }
  if constexpr (kTell) return __syncthreads_or(last) != 0;
  return last != 0;
}

}  // namespace expertlink::kernels
