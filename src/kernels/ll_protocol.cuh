// The low-latency (LL) intranode protocol: buffer layout, signals and the helpers its kernels share.
//
// LL region of every rank's window (data region offset g.region_offset), four equal areas whose offsets
// depend only on ll_bytes, so calls of different shapes never overlap an area still in use:
//   [dispatch area, parity 0][dispatch area, parity 1][combine area, parity 0][combine area, parity 1]
// Calls alternate parities (dispatches and combines counted separately), so two of each may be in flight.
// Each use of a parity has a use count n = 1, 2, ...; all ranks agree on it (same calls, same order), and
// every signal carries it, so nothing is ever reset (CUDA-graph replays keep working).
//
// Dispatch area of receiver d (written by every source s over NVLink, read only by d):
//   meta[s]:      i32 [8 + E_local]: T_s, H, K, E, 0..., then the number of s's tokens that picked each
//                 of d's local experts (a token counts an expert once)
//   msg[s][t]:    for every token t < T_s: [row: FP8 (H bytes) or BF16 (2H)][scales: H/128 f32 or
//                 ceil(H/512) packed UE8M0 words][header: K i32]. header[k] = -1 when pick k is not on d,
//                 else local expert j | pos << 10 | dup << 30: pos = rank of t among s's tokens that
//                 picked j, dup = an earlier slot of t names the same expert. Row and scales are written
//                 only when t has an expert on d; the header always.
// Send (every rank, blocks own contiguous token ranges): a block waits until each d has freed its
// dispatch area of this parity (kDispatchFree[p][d] >= n - 1), counts the experts picked before its range
// (histogram in shared memory), then for each of its tokens computes the header, casts the row once (FP8
// fused) and writes row, scales and header into every d. The block owning the last range writes the
// meta records. Fence, then the last block to finish publishes kDispatchData[p][s] = n in every d (release).
// Receive (rank d): wait for every source's kDispatchData >= n, build begin[j][s] = prefix over s of the
// counts, then warps copy each message's row and scales to recv_x[j][begin[j][s] + pos] for every
// non-dup pick on d, in parallel. The output order is (source rank, source token): deterministic. The last
// block to finish reading tells every source kDispatchFree[p][d] = n.
//
// Combine area of source s (written by every expert holder d and every source):
//   partial[d][t]: BF16 [H]: d's sum over t's picks on d of weight * expert output (float, rounded once)
//   weights[s'][t][k]: (f32 weight, i32 expert or -1) of source s' token t, pushed by s' for d = this rank
// Combine send (rank r): wait until each peer freed its combine area of this parity; push (weight, id) of
// r's tokens to each rank holding one of their experts, publish kCombineWeights; wait for every source's
// weights; compute for every dispatched (s, t) with picks here the weighted partial sum and write it into
// s's area; the last block publishes kCombineData[p][r] = n in every s. Combine receive (rank s): wait
// for kCombineData from every rank, out[t] = sum of the partials of the ranks t went to (rank ascending),
// then kCombineFree[p][s] = n to every rank. NVLink carries one row per (token, rank), not per expert.
//
// Memory ordering everywhere: payload stores, __threadfence_system by every writer thread, __syncthreads,
// a device-scope counter of finished blocks; the last block publishes with st.release.sys; readers poll
// with ld.acquire.sys (bounded) and then read the payload with ld.global.cg (L2, where NVLink writes land).
#pragma once

#include <cstdint>

#include "comm/control_layout.hpp"
#include "kernels/ll_kernels.hpp"
#include "kernels/sync.cuh"

namespace expertlink::kernels {

inline constexpr int kLlWarps = kLlThreads / 32;
inline constexpr int kLlUnroll = 4;                    // 16-byte vectors per lane per work unit
inline constexpr int kLlSegmentVecs = 32 * kLlUnroll;  // vectors of a row per warp work unit

__device__ __forceinline__ uint64_t* ll_signal(char* window, size_t array, int parity, int rank) {
  return reinterpret_cast<uint64_t*>(window + array) + parity * kMaxRanks + rank;
}

// Area `which` (0, 1: dispatch parity 0, 1; 2, 3: combine parity 0, 1) of the window at `window`.
__device__ __forceinline__ char* ll_area(char* window, const LlGeometry& g, int which) {
  return window + kControlBytes + g.region_offset + which * g.area_bytes;
}

__device__ __forceinline__ int64_t ll_load_index(const void* p, IdxType type, int64_t offset) {
  return type == IdxType::kI64 ? static_cast<const int64_t*>(p)[offset]
                               : static_cast<const int32_t*>(p)[offset];
}

__device__ __forceinline__ int4 ll_ld_nc(const void* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
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

// Called by all threads of every block after its part of a phase. Makes the block's writes (local and
// remote) visible system-wide, counts the block, and returns true in exactly one block: the last one,
// which may then publish a release signal that covers every block's writes.
__device__ __forceinline__ bool ll_last_block(uint32_t* counter) {
  __shared__ int last;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (last) {
      *counter = 0;  // the next kernel of this phase and parity starts after this one ends
      __threadfence_system();
    }
  }
  __syncthreads();
  return last != 0;
}

// Bounded waits of threads [0, R) of a block for signal slots `array`[parity][r] >= expected in the
// local window; returns false in every thread of the block if any timed out (or the window is broken).
__device__ __forceinline__ bool ll_wait_all(const SymmetricView& w, size_t array, int parity,
                                            uint64_t expected, WaitSite site, int num_ranks) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  const WaitContext ctx{w.record, w.timeout_ns, w.rank};
  if (threadIdx.x < num_ranks && !wait_geq(ll_signal(w.local_base, array, parity, threadIdx.x), expected, ctx,
                                           site, threadIdx.x, parity))
    failed = 1;
  __syncthreads();
  return failed == 0;
}

}  // namespace expertlink::kernels
