// The low-latency (LL) intranode protocol: buffer layout, signals and the helpers its kernels share.
// Time budget and the reasons for this design: docs/ll_performance.md.
//
// LL region of every rank's window (data region offset g.region_offset), four equal areas whose offsets
// depend only on ll_bytes, so calls of different shapes never overlap an area still in use:
//   [dispatch area, parity 0][dispatch area, parity 1][combine area, parity 0][combine area, parity 1]
// Calls alternate parities (dispatches and combines counted separately), so two of each may be in flight.
// Each use of a parity has a use count n = 1, 2, ...; all ranks agree on it (same calls, same order), and
// every flag carries it, so nothing is ever reset (CUDA-graph replays keep working). The use counts live
// in device memory (LlDeviceState::seq): each kernel reads them when it starts and the last of its blocks
// to finish advances them.
//
// Two ways a value is published to a peer:
//  - flag: payload stores, then a barrier (warp: combine; block: dispatch) and a system fence in the
//    releasing thread, cumulative over the stores the barrier ordered before it (in dispatch only the
//    releasing warp fences, so the block's other warps need not wait for it); then that thread stores n
//    into a u64 flag (st.relaxed.sys after the fence: a release store would fence a second time). The reader
//    polls the flag with ld.acquire.sys (bounded), then reads the payload with ld.global.cg (L2, where
//    NVLink writes land).
//  - tagged word: the value and the use count in one aligned 8-byte store (high 32 bits: tag, low 32
//    bits: value; NCCL's LL protocol). 8-byte stores are single-copy atomic, so a reader that sees the tag
//    of use n sees that use's value: no fence, no flag, no extra hop. Used for the small things (per-expert
//    counts, combine weights).
// Flags and tagged words sit at the start of their area at offsets that depend only on R (LlGeometry):
// those bytes never hold anything else, so a stale value there is an older use's tag, never row data.
// The window is zeroed at construction (before the collective registration): every tag starts at 0.
//
// Dispatch area of receiver d (written by every source s over NVLink, read only by d):
//   meta[s][i]:  tagged words: [0] T_s, [1] H, [2] K, [3] E, [8 + j] number of s's tokens that picked d's
//                local expert j (a token counts an expert once). Tag = low 32 bits of n.
//   dflag[s][t]: u64 flag: s has written message t of use n.
//   msg[s][t]:   for every token t < T_s: [row: FP8 (H bytes) or BF16 (2H)][scales: H/128 f32 or
//                ceil(H/512) packed UE8M0 words][header: K i32]. header[k] = -1 when pick k is not on d,
//                else local expert j | pos << 10 | dup << 30: pos = rank of t among s's tokens that
//                picked j, dup = an earlier slot of t names the same expert. Row and scales are written
//                only when t has an expert on d; the header (and the flag) always.
// Send (rank s): the last block counts every token's experts and writes the meta words into every d.
// The other blocks own contiguous token ranges; each loads its first token's row, its top-k and the top-k
// of the tokens before its range in one go, counts those (positions), checks that every d has freed this
// parity's area (kDispatchFree[p][d] >= n - 1), then per token computes the header, casts the row once
// (FP8 fused) and writes row, scales and header into every d that holds one of its experts (header only
// into the others). Then fence, barrier, and the flags of its tokens into every d.
// Receive (rank d): every block waits for the meta words of every source, builds begin[j][s] = prefix
// over s of the counts; warps take (message, 2 KB segment) units, wait for the message's flag and copy
// the segment (and scales) to recv_x[j][begin[j][s] + pos] for every non-dup pick on d. Messages are
// expanded as they land; the output order is (source rank, source token): deterministic. The last block
// to finish tells every source kDispatchFree[p][d] = n.
//
// Combine area of rank r (as source of tokens and as expert holder):
//   wword[s][t][k]: tagged words from source s: f32 weight of s's token t, pick k; tag = n << 1 | valid
//                   (valid: the combine-time topk_idx slot is not -1).
//   pflag[d][t][q]: u64 flag: holder d has written segment q of its partial row for r's token t.
//   partial[d][t]:  BF16 [H]: d's sum over t's picks on d of weight * expert output (float, rounded once)
// Combine send (rank r): warps push r's tokens' weights as tagged words into every rank holding one of
// their experts (after that rank freed this parity's combine area, kCombineFree >= n - 1). Warps take
// (source s, token t, segment q) units of the tokens dispatched here: load the slots (dispatch handle) and
// the expert outputs, wait for the weights' tags, sum in pick order, write the BF16 segment into s's area,
// fence, flag pflag[r][t][q]. Combine receive (rank s): warps take (token, segment) units, wait for the
// flags of the ranks the token went to and add their partials in rank order. The last block to finish
// tells every rank kCombineFree[p][s] = n. NVLink carries one row per (token, rank), not per expert, and
// the data crosses it once.
//
// Finished-block counters (LlDeviceState::done) need no fences: they only order reads (a block's reads
// are complete when its barrier passes) before the free signal, and the kernel's end orders its writes.
#pragma once

#include <cstdint>

#include "check.hpp"
#include "comm/control_layout.hpp"
#include "kernels/ll_kernels.hpp"
#include "kernels/sync.cuh"
#include "kernels/vector_io.cuh"

namespace expertlink::kernels {

inline constexpr int kLlWarps = kLlThreads / 32;

// EXPERTLINK_LL_TRACE: this warp's stamp of `point` (lane 0; nothing when tracing is off). Compiled in
// only with the build option EXPERTLINK_LL_TRACE=ON: the stamps cost the dispatch kernel 15 registers.
__device__ __forceinline__ void ll_stamp(uint64_t* trace, int point) {
#ifdef EXPERTLINK_LL_TRACE_STAMPS
  if (trace != nullptr && (threadIdx.x & 31) == 0)
    trace[(static_cast<int64_t>(blockIdx.x) * kLlWarps + threadIdx.x / 32) * kLlTracePoints + point] =
        global_timer_ns();
#else
  (void)trace;
  (void)point;
#endif
}

__device__ __forceinline__ uint64_t* ll_signal(char* window, size_t array, int parity, int rank) {
  return reinterpret_cast<uint64_t*>(window + array) + parity * kMaxRanks + rank;
}

// Area `which` (0, 1: dispatch parity 0, 1; 2, 3: combine parity 0, 1) of the window at `window`.
__device__ __forceinline__ char* ll_area(char* window, const LlGeometry& g, int which) {
  return window + kControlBytes + g.region_offset + which * g.area_bytes;
}

// Dispatch area: meta word i of source s, message flag of (s, t).
__device__ __forceinline__ uint64_t* ll_meta_word(char* area, const LlGeometry& g, int s, int i) {
  return reinterpret_cast<uint64_t*>(area + g.meta_offset) + static_cast<int64_t>(s) * kLlMetaWords + i;
}
__device__ __forceinline__ uint64_t* ll_dflag(char* area, const LlGeometry& g, int s, int t) {
  return reinterpret_cast<uint64_t*>(area + g.dflag_offset) + static_cast<int64_t>(s) * kLlMaxTokens + t;
}
// Combine area: weight word of (source s, token t, pick k); partial flag of (holder d, token t, segment q).
__device__ __forceinline__ uint64_t* ll_wword(char* area, const LlGeometry& g, int s, int t, int k) {
  return reinterpret_cast<uint64_t*>(area + g.wword_offset) +
         (static_cast<int64_t>(s) * kLlMaxTokens + t) * kLlMaxTopk + k;
}
__device__ __forceinline__ uint64_t* ll_pflag(char* area, const LlGeometry& g, int d, int t, int q) {
  return reinterpret_cast<uint64_t*>(area + g.pflag_offset) +
         (static_cast<int64_t>(d) * kLlMaxTokens + t) * kLlMaxSegs + q;
}

__device__ __forceinline__ void ll_st_relaxed_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t ll_ld_relaxed_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t ll_tagged(uint32_t tag, uint32_t value) {
  return (static_cast<uint64_t>(tag) << 32) | value;
}

// Bounded wait until the tagged word at `p` carries a tag t with (t & mask) == expect; returns its value
// in `value`. On timeout records (site, peer, counter, expected tag, last tag seen) and returns false.
__device__ __forceinline__ bool ll_wait_tag(const uint64_t* p, uint32_t expect, uint32_t mask,
                                            const WaitContext& ctx, WaitSite site, int peer, int counter,
                                            uint64_t& value) {
  value = ll_ld_relaxed_sys(p);
  if ((static_cast<uint32_t>(value >> 32) & mask) == expect) return true;
  const uint64_t start = global_timer_ns();
  for (uint32_t polls = 1;; ++polls) {
    value = ll_ld_relaxed_sys(p);
    if ((static_cast<uint32_t>(value >> 32) & mask) == expect) return true;
    if ((polls & 255u) == 0) {
      const uint64_t waited = global_timer_ns() - start;
      if (waited > ctx.timeout_ns) {
        record_timeout(ctx, site, peer, counter, expect, value >> 32, waited);
        return false;
      }
      if (wait_aborted(ctx)) return false;
    }
  }
}

__device__ __forceinline__ uint64_t ll_warp_or(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(~0u, v, o);
  return v;
}

// Records the first invalid expert id seen (token, slot, value) for the host; the pick is ignored.
// Protocol: claim with CAS 0 -> 1, fill, fence, publish 2; the host reads the fields once it sees 2.
__device__ __forceinline__ void ll_flag_bad_expert(const LlDeviceState& st, int token, int slot,
                                                   int64_t value) {
  volatile int32_t* f = st.host_flags;
  if (atomicCAS(st.host_flags, 0, 1) == 0) {
    f[1] = token;
    f[2] = slot;
    f[3] = static_cast<int32_t>(value < INT32_MIN ? INT32_MIN : value > INT32_MAX ? INT32_MAX : value);
    __threadfence_system();
    atomicExch(st.host_flags, 2);
  }
}

// The use count a kernel works on: one more than the last finished use of (counter, parity). Read once
// per thread at kernel start; the last block to finish advances it (ll_block_done), after every block has
// read it.
__device__ __forceinline__ uint64_t ll_use(const LlDeviceState& st, int seq_index) {
  return __ldcg(reinterpret_cast<const unsigned long long*>(st.seq + seq_index)) + 1;
}

// Called by all threads of every block when its part of the kernel is over: returns true in exactly one
// block, the last one. The acq_rel atomic orders every block's earlier reads (complete at its barrier)
// before whatever the last block does next (release the "free" signal, advance the use counts). No
// system fence: the kernel's end orders its writes for the next kernel on the stream.
__device__ __forceinline__ bool ll_block_done(uint32_t* counter) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
    last = old == gridDim.x - 1;
    if (last) *reinterpret_cast<volatile uint32_t*>(counter) = 0;  // the next kernel starts after this one
  }
  __syncthreads();
  return last != 0;
}

// Bounded wait of the calling thread until peer `d` has freed area `array`[parity] of use n - 1, i.e.
// kFree[parity][d] in the local window >= n - 1. False on timeout (recorded).
__device__ __forceinline__ bool ll_wait_free(const SymmetricView& w, size_t array, int parity, uint64_t n,
                                             WaitSite site, int d) {
  const WaitContext ctx{w.record, w.timeout_ns, w.rank};
  return wait_geq(ll_signal(w.local_base, array, parity, d), n - 1, ctx, site, d, parity);
}

// Host side of the fused LL kernels: blocks of kLlThreads that may be resident per SM, and a cooperative
// launch (every block resident at once, so blocks that wait never starve the blocks they wait for).
template <typename Params>
int ll_blocks_per_sm(void (*kernel)(Params)) {
  int blocks = 0;
  EL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kLlThreads, 0));
  return blocks;
}

template <typename Params>
void ll_launch_cooperative(void (*kernel)(Params), const Params& p, int grid, cudaStream_t stream) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kLlThreads);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  EL_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

}  // namespace expertlink::kernels
