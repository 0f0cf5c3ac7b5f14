// HT layout (DeepEP's get_dispatch_layout) and notify (count exchange). Protocol: ht_protocol.cuh.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>

#include <cub/block/block_scan.cuh>

#include "check.hpp"
#include "kernels/ht_protocol.cuh"

namespace expertlink::kernels {
namespace {

__device__ __forceinline__ int expert_rank(int64_t e, int experts_per_rank) {
  return static_cast<int>(e) / experts_per_rank;
}

// One token's routing, shared by get_dispatch_layout and notify's scan: the mask of destination ranks
// (bit d: a pick lives on rank d; ranks <= 64) and each expert counted once per token, at its first pick.
// `id(k)` reads pick k; `rank_of(k, e)` is the rank pick k (= e) goes to, or -1 where it goes nowhere
// (each kernel's rule: ids out of range, the bad-id record, masked ranks); it is called once per pick.
// `count(e)` counts expert e. The first-pick test compares raw ids: rank_of only maps an id to -1 or
// keeps it, so a pick equal to a routed one is routed too.
template <typename Id, typename RankOf, typename Count>
__device__ __forceinline__ uint64_t route_token(int topk, Id id, RankOf rank_of, Count count) {
  uint64_t mask = 0;
  for (int k = 0; k < topk; ++k) {
    const int64_t e = id(k);
    const int dest = rank_of(k, e);
    if (dest < 0) continue;
    mask |= 1ull << dest;
    bool first = true;
    for (int j = 0; j < k && first; ++j) first = id(j) != e;
    if (first) count(e);
  }
  return mask;
}

__global__ void ht_layout_kernel(const void* idx, IdxType type, int64_t rs, int64_t cs, int num_tokens,
                                 int topk, int num_experts, int num_ranks, int32_t* tokens_per_rank,
                                 int32_t* tokens_per_expert, uint8_t* is_token_in_rank) {
  const int experts_per_rank = num_experts / num_ranks;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < num_tokens; t += gridDim.x * blockDim.x) {
    // Ids straight from global memory (L1 serves the first-pick test's repeats). Ids outside
    // [0, num_experts) are ignored (no bad-id record on this path); no rank is masked.
    auto id = [&](int k) { return load_index(idx, type, t * rs + k * cs); };
    auto rank_of = [&](int, int64_t e) {
      return e >= 0 && e < num_experts ? expert_rank(e, experts_per_rank) : -1;
    };
    auto count = [&](int64_t e) { atomicAdd(&tokens_per_expert[e], 1); };
    const uint64_t mask = route_token(topk, id, rank_of, count);
    for (int d = 0; d < num_ranks; ++d) {
      const bool in = (mask >> d) & 1;
      if (is_token_in_rank != nullptr) is_token_in_rank[int64_t(t) * num_ranks + d] = in;
      if (in) atomicAdd(&tokens_per_rank[d], 1);
    }
  }
}

static_assert(kScanBad == kMaxExpertsTotal, "the scan's bad-id record follows its counts");

// Notify's routing scan, on many blocks (one block scanning T = 4096 x 8 picks took 26-48 us, bound by
// one SM's shared-memory atomics and load latency): each thread takes tokens, loads their picks, writes
// the destination mask (handle.token_mask) and counts each expert once per token in the block's
// histogram; blocks then add their histograms into state.scan. Bad ids (outside [-1, E)) go to the scan's
// bad record (first one wins) and count as -1, as do picks of a masked rank.
constexpr int kScanThreads = 256;

__global__ void __launch_bounds__(kScanThreads) ht_scan_kernel(HtNotifyParams p) {
  __shared__ int count[kMaxExpertsTotal];
  wait_prior_grids();  // a dependent launch; the notify kernel after it waits for it in turn
  allow_dependent_launch();
  const SymmetricView& w = p.win;
  const int T = p.num_tokens, E = p.num_experts, experts_per_rank = E / w.num_ranks;
  for (int e = threadIdx.x; e < E; e += kScanThreads) count[e] = 0;
  __syncthreads();
  for (int t = blockIdx.x * kScanThreads + threadIdx.x; t < T; t += gridDim.x * kScanThreads) {
    // Runtime-indexed (local memory, L1-resident): all loads issued before any is used.
    int64_t ids[kMaxTopkDevice];
    for (int k = 0; k < p.topk; ++k)
      ids[k] = load_index(p.topk_idx, p.idx_type, t * p.idx_row_stride + k * p.idx_col_stride);
    // The first bad id goes to the bad record; bad ids and picks of a masked rank route nowhere.
    auto rank_of = [&](int k, int64_t e) {
      if (e == -1) return -1;
      if (e < -1 || e >= E) {
        if (atomicCAS(&p.state.scan[kScanBad], 0, 1) == 0) {
          p.state.scan[kScanBad + 1] = t;
          p.state.scan[kScanBad + 2] = k;
          p.state.scan[kScanBad + 3] = static_cast<int32_t>(e < INT32_MIN   ? INT32_MIN
                                                            : e > INT32_MAX ? INT32_MAX
                                                                            : e);
        }
        return -1;
      }
      const int dest = expert_rank(e, experts_per_rank);
      return rank_live(w, dest) ? dest : -1;
    };
    p.handle.token_mask[t] = route_token(
        p.topk, [&](int k) { return ids[k]; }, rank_of, [&](int64_t e) { atomicAdd(&count[e], 1); });
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kScanThreads)
    if (count[e] != 0) atomicAdd(&p.state.scan[e], count[e]);
}

constexpr int kNotifyThreads = 1024;
constexpr int kMaskRegs = 8;  // destination masks a notify thread keeps in registers
// Destinations whose positions one block-wide scan computes together, their counts packed into the two
// 16-bit halves of one int (T < 2^16: no carry crosses; larger T takes one destination per scan): one
// scan, place pass and set of barriers for two destinations. 2x H200, 2026-11-28 (notify trace, R = 2):
// the records phase 8.7-8.8 -> 7.9-8.0 us, notify 18.0-18.8 -> 17.7-18.0 (so most of that phase is not
// the per-destination passes). Scanning 4 counts as a struct spilled 624 bytes, 2 in a 64-bit value 196
// (1024 threads, 64 registers); this spills 16 (8 before).
constexpr int kFold = 2;

__global__ void __launch_bounds__(kNotifyThreads, 1) ht_notify_kernel(HtNotifyParams p) {
  using BlockScan = cub::BlockScan<int, kNotifyThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int expert_count[kMaxExpertsTotal];
  __shared__ int chunk_count[kFold][kMaxChunks];
  __shared__ int dest_total[kMaxRanks];  // rows this rank sends to each rank
  __shared__ int failed;
  // A dependent launch of the scan (or of the previous work): wait for it, then let the dispatch kernel
  // be launched and become resident (it waits for this one in turn; kernels/pdl.hpp).
  wait_prior_grids();
  allow_dependent_launch();

  const SymmetricView& w = p.win;
  const int me = w.rank, R = w.num_ranks, T = p.num_tokens, tid = threadIdx.x;
  const uint64_t round = p.state.rounds[0] + 1;
  const bool by_topk = p.topk_idx != nullptr;
  const int experts_per_rank = by_topk ? p.num_experts / R : 1;
  const int chunk_tokens = ht_chunk_tokens(T), num_chunks = ht_num_chunks(T);
  const int per_thread = (T + kNotifyThreads - 1) / kNotifyThreads;
  const int t_begin = min(T, tid * per_thread), t_end = min(T, t_begin + per_thread);

  // Phase stamps (tracing only): start, ids scanned, masks loaded, first pass scanned, first pass placed,
  // records written, published, peers' records in, layout derived, end.
  auto stamp = [&](int i) {
    if (p.trace != nullptr && tid == 0) p.trace[i] = global_timer_ns();
  };
  stamp(0);
  if (tid == 0) {
    failed = 0;
    p.handle.host_counts[kHostBadExpert] = 0;
  }
  for (int e = tid; e < kMaxExpertsTotal; e += kNotifyThreads) expert_count[e] = 0;
  __syncthreads();

  // Pass 1: the routing scan (ht_scan_kernel, just before on the stream) has written token_mask and
  // left the per-expert counts and the first bad id in state.scan; take them and zero them for the next
  // call. Without top-k ids, the destination masks come from is_token_in_rank here.
  if (by_topk) {
    for (int e = tid; e < p.num_experts; e += kNotifyThreads) {
      expert_count[e] = p.state.scan[e];
      p.state.scan[e] = 0;
    }
    if (tid == 0 && p.state.scan[kScanBad] != 0) {
      p.handle.host_counts[3] = p.state.scan[kScanBad + 1];
      p.handle.host_counts[4] = p.state.scan[kScanBad + 2];
      p.handle.host_counts[5] = p.state.scan[kScanBad + 3];
      p.handle.host_counts[kHostBadExpert] = 1;
      p.state.scan[kScanBad] = 0;
    }
  } else {
    for (int t = tid; t < T; t += kNotifyThreads) {
      uint64_t mask = 0;
      for (int d = 0; d < R; ++d)
        if (p.is_token_in_rank[t * p.in_rank_row_stride + d] != 0 && rank_live(w, d)) mask |= 1ull << d;
      p.handle.token_mask[t] = mask;
    }
  }
  __syncthreads();
  stamp(1);

  // This thread's tokens' destination masks, loaded once for every destination and all at once: the
  // first kMaskRegs in registers (T <= kMaskRegs * kNotifyThreads), the rest read again where needed. A
  // load after a store waits for the one before (they might alias): loading a mask per token between
  // the send_pos stores made the per-destination pass a chain of round trips.
  uint64_t masks[kMaskRegs];
#pragma unroll
  for (int i = 0; i < kMaskRegs; ++i) masks[i] = t_begin + i < t_end ? p.handle.token_mask[t_begin + i] : 0;
  if (p.trace != nullptr) {  // tracing only: the masks have arrived (thread 0's) before the stamp
    uint64_t all = 0;
#pragma unroll
    for (int i = 0; i < kMaskRegs; ++i) all |= masks[i];
    if (tid == 0 && all != ~0ull) stamp(2);
  }

  // kFold destinations at a time: positions in token order, per-chunk counts, then the meta records into
  // their windows.
  const int fold = T < (1 << 16) ? kFold : 1;
  for (int d0 = 0; d0 < R; d0 += fold) {
    const int F = min(fold, R - d0);
    for (int i = tid; i < kFold * kMaxChunks; i += kNotifyThreads) (&chunk_count[0][0])[i] = 0;
    // Pass 2, a contiguous token range per thread (positions are in token order). Destination d0's
    // count in the low half, d0 + 1's in the high half.
    int mine = 0;
    auto count = [&](uint64_t mask) {
      const int bits = static_cast<int>(mask >> d0);
      mine += (bits & 1) | (F > 1 ? (bits & 2) << 15 : 0);
    };
#pragma unroll
    for (int i = 0; i < kMaskRegs; ++i) count(masks[i]);  // 0 past t_end
    for (int t = t_begin + kMaskRegs; t < t_end; ++t) count(p.handle.token_mask[t]);
    int offsets = 0, totals = 0;
    BlockScan(scan_storage).ExclusiveSum(mine, offsets, totals);
    __syncthreads();
    if (d0 == 0) stamp(3);
    int offset[kFold] = {F > 1 ? offsets & 0xffff : offsets, offsets >> 16};
    // Thread f < F: destination d0 + f's total (a select, not an array indexed by the thread).
    const int total = F == 1 ? totals : tid == 0 ? totals & 0xffff : totals >> 16;
    auto place = [&](int t, uint64_t mask) {
      const uint64_t bits = mask >> d0;
#pragma unroll
      for (int f = 0; f < kFold; ++f) {
        if (f >= F) break;
        const bool in = (bits >> f) & 1;
        p.handle.send_pos[int64_t(t) * R + d0 + f] = in ? offset[f] : -1;
        if (in) {
          ++offset[f];
          atomicAdd(&chunk_count[f][t / chunk_tokens], 1);
        }
      }
    };
#pragma unroll
    for (int i = 0; i < kMaskRegs; ++i)
      if (t_begin + i < t_end) place(t_begin + i, masks[i]);
    for (int t = t_begin + kMaskRegs; t < t_end; ++t) place(t, p.handle.token_mask[t]);
    __syncthreads();
    if (d0 == 0) stamp(4);
    if (tid < F) dest_total[d0 + tid] = total;
    if (tid < F && rank_live(w, d0 + tid)) {
      int32_t* meta = meta_record(w.peer_base[d0 + tid], round, me);
      meta[0] = T;
      meta[1] = total;
      meta[2] = p.hidden;
      meta[3] = p.topk;
      meta[4] = by_topk ? p.num_experts : 0;
    }
    for (int i = tid; i < F * num_chunks; i += kNotifyThreads) {
      const int f = i / num_chunks, c = i - f * num_chunks;
      if (rank_live(w, d0 + f))
        meta_record(w.peer_base[d0 + f], round, me)[control::kMetaHeader + c] = chunk_count[f][c];
    }
    if (by_topk)
      for (int i = tid; i < F * experts_per_rank; i += kNotifyThreads) {
        const int f = i / experts_per_rank, j = i - f * experts_per_rank, d = d0 + f;
        if (rank_live(w, d))
          meta_record(w.peer_base[d], round, me)[control::kMetaHeader + kMaxChunks + j] =
              expert_count[d * experts_per_rank + j];
      }
    __syncthreads();
  }

  // Every record also carries this rank's totals to every rank (dest_total is complete: the loop's barrier).
  for (int i = tid; i < R * R; i += kNotifyThreads) {
    const int d = i / R, j = i % R;
    if (rank_live(w, d)) meta_record(w.peer_base[d], round, me)[control::kMetaTotals + j] = dest_total[j];
  }
  // Publish: every thread's meta writes (block barrier), then per destination one system fence and a
  // release store. A fence in every thread would wait for the block's host-mapped writes 1024 times.
  __syncthreads();
  stamp(5);
  if (tid < R && rank_live(w, tid)) {
    __threadfence_system();
    st_release_sys(control_u64(w.peer_base[tid], control::kNotifyTag, me), round);
  }

  stamp(6);
  const WaitContext ctx{w.record, w.timeout_ns, me};
  if (tid < R && rank_live(w, tid) &&
      !wait_geq(control_u64(w.local_base, control::kNotifyTag, tid), round, ctx, WaitSite::kHtNotify, tid,
                tid))
    failed = 1;
  __syncthreads();
  if (failed) return;
  stamp(7);

  // Every live source's record has arrived: derive the receiving layout (a masked source sends nothing).
  // Chunk prefixes of every source: one block-wide scan per source (thread c holds chunk c's count).
  // A serial loop over the counts would wait on each load of the peer-written record in turn.
  for (int s = 0; s < R; ++s) {
    const int32_t* meta = meta_record(w.local_base, round, s);
    const bool live = rank_live(w, s);
    // The count is requested with T_s, not after it (the slots past T_s's chunks are ignored).
    const int raw = live && tid < kMaxChunks ? meta[control::kMetaHeader + tid] : 0;
    const int src_T = live ? meta[0] : 0, n = ht_num_chunks(src_T);
    const int count = tid < n ? raw : 0;
    int prefix = 0, total = 0;
    BlockScan(scan_storage).ExclusiveSum(count, prefix, total);
    int32_t* out = p.handle.chunk_prefix + s * (kMaxChunks + 1);
    if (tid < n) out[tid] = prefix;
    if (tid == 0) {
      out[n] = total;
      p.handle.src_tokens[s] = src_T;
    }
    if (live && tid < 3) {
      const int64_t ours[3] = {p.hidden, p.topk, by_topk ? p.num_experts : 0};
      if (meta[2 + tid] != ours[tid])
        record_timeout(ctx, WaitSite::kMismatch, s, tid, ours[tid], meta[2 + tid], 0);
    }
    __syncthreads();  // scan_storage is reused
  }
  stamp(8);
  if (tid == 0) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      p.handle.rank_prefix[s] = acc;
      acc += rank_live(w, s) ? meta_record(w.local_base, round, s)[1] : 0;
    }
    p.handle.rank_prefix[R] = acc;
    p.handle.host_counts[kHostTotal] = acc;
    // Over capacity is not a protocol failure (every rank still runs the whole protocol, rows past the
    // capacity are not written): it is flagged on the handle, and the host raises it.
    p.handle.host_counts[kHostOverCapacity] = acc > p.handle.capacity ? 1 : 0;
  }
  // Where this rank's rows land at each destination d: after the rows of the live sources before it.
  if (tid < R) {
    int row0 = 0;
    for (int s = 0; s < me; ++s)
      if (rank_live(w, s)) row0 += meta_record(w.local_base, round, s)[control::kMetaTotals + tid];
    p.handle.dest_row0[tid] = row0;
  }
  if (by_topk) {
    for (int j = tid; j < experts_per_rank; j += kNotifyThreads) {
      int sum = 0;
      for (int s = 0; s < R; ++s)
        if (rank_live(w, s))
          sum += meta_record(w.local_base, round, s)[control::kMetaHeader + kMaxChunks + j];
      sum = (sum + p.expert_alignment - 1) / p.expert_alignment * p.expert_alignment;
      p.handle.expert_count[j] = sum;
      p.handle.host_counts[kHostHeader + j] = sum;
    }
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence_system();
    p.state.rounds[0] = round;
  }
  stamp(9);
}

}  // namespace

void launch_ht_layout(const void* topk_idx, IdxType idx_type, int64_t idx_row_stride, int64_t idx_col_stride,
                      int num_tokens, int topk, int num_experts, int num_ranks, int32_t* tokens_per_rank,
                      int32_t* tokens_per_expert, uint8_t* is_token_in_rank, cudaStream_t stream) {
  EL_CUDA_CHECK(cudaMemsetAsync(tokens_per_rank, 0, sizeof(int32_t) * num_ranks, stream));
  EL_CUDA_CHECK(cudaMemsetAsync(tokens_per_expert, 0, sizeof(int32_t) * num_experts, stream));
  if (num_tokens == 0) return;
  int blocks = (num_tokens + 255) / 256;
  ht_layout_kernel<<<blocks, 256, 0, stream>>>(topk_idx, idx_type, idx_row_stride, idx_col_stride, num_tokens,
                                               topk, num_experts, num_ranks, tokens_per_rank,
                                               tokens_per_expert, is_token_in_rank);
  EL_CUDA_CHECK(cudaGetLastError());
}

// EXPERTLINK_HT_NOTIFY_TRACE=1 (diagnostics only): the kernel stamps its phases with the GPU clock and
// the next notify prints the previous one's phase durations (synchronizing the device to read them).
uint64_t* notify_trace() {
  static const bool on = std::getenv("EXPERTLINK_HT_NOTIFY_TRACE") != nullptr;
  static uint64_t* trace = nullptr;
  if (!on) return nullptr;
  if (trace == nullptr) {
    EL_CUDA_CHECK(cudaMalloc(&trace, sizeof(uint64_t) * kNotifyTracePoints));
    EL_CUDA_CHECK(cudaMemset(trace, 0, sizeof(uint64_t) * kNotifyTracePoints));
    return trace;
  }
  uint64_t t[kNotifyTracePoints];
  EL_CUDA_CHECK(cudaMemcpy(t, trace, sizeof(t), cudaMemcpyDeviceToHost));
  auto us = [&](int a, int b) { return (t[b] - t[a]) / 1e3; };
  if (t[0] != 0 && t[9] >= t[0])
    std::fprintf(stderr,
                 "notify trace (us): scan %.1f, records %.1f (masks %.1f, block scan %.1f, place %.1f, meta "
                 "%.1f), publish %.1f, wait %.1f, derive %.1f, counts %.1f, total %.1f\n",
                 us(0, 1), us(1, 5), us(1, 2), us(2, 3), us(3, 4), us(4, 5), us(5, 6), us(6, 7), us(7, 8),
                 us(8, 9), us(0, 9));
  return trace;
}

void launch_ht_notify(const HtNotifyParams& p, cudaStream_t stream) {
  HtNotifyParams q = p;
  q.trace = notify_trace();
  if (q.topk_idx != nullptr && q.num_tokens > 0) {
    // One token per thread, at most 2 blocks per SM's worth (more only adds histogram merges).
    const int blocks = std::min((q.num_tokens + kScanThreads - 1) / kScanThreads, 264);
    launch_dependent(ht_scan_kernel, q, blocks, kScanThreads, 0, stream);
  }
  launch_dependent(ht_notify_kernel, q, 1, kNotifyThreads, 0, stream);
}

}  // namespace expertlink::kernels
