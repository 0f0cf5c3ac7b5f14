// Cross-rank barrier over the window's control region, usable by one block of any kernel.
//
// Protocol: rank r keeps a device-local epoch counter. Entering barrier number e (= ++epoch), thread p
// stores e with release semantics into peer p's barrier_signal[r], then waits (bounded) until its own
// barrier_signal[p] >= e. The block barrier, then a system fence and the release store in the
// signalling thread, make the block's prior writes visible to any peer that acquired the signal.
#pragma once

#include "comm/symmetric_memory.hpp"
#include "kernels/sync.cuh"

namespace expertlink::kernels {

__device__ __forceinline__ uint64_t* barrier_signal(char* window_base, int slot) {
  return reinterpret_cast<uint64_t*>(window_base) + slot;
}

// Called by every thread of one block (blockDim.x >= num_ranks). Returns false on timeout.
__device__ __forceinline__ bool barrier_block(const SymmetricView& v) {
  __shared__ uint64_t epoch;
  __shared__ int ok;
  __syncthreads();  // this block's earlier writes, then (fence in each signalling thread) the signals
  if (threadIdx.x == 0) {
    epoch = *v.barrier_epoch + 1;
    *v.barrier_epoch = epoch;
    ok = 1;
  }
  __syncthreads();
  const WaitContext ctx{v.record, v.timeout_ns, v.rank};
  for (int p = threadIdx.x; p < v.num_ranks; p += blockDim.x) {  // masked ranks are left out
    if (!rank_live(v, p)) continue;
    __threadfence_system();
    st_release_sys(barrier_signal(v.peer_base[p], v.rank), epoch);
  }
  for (int p = threadIdx.x; p < v.num_ranks; p += blockDim.x) {
    if (rank_live(v, p) && !wait_geq(barrier_signal(v.local_base, p), epoch, ctx, WaitSite::kBarrier, p, p))
      ok = 0;
  }
  __syncthreads();
  return ok != 0;
}

}  // namespace expertlink::kernels
