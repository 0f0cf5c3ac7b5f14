// Bulk (TMA) copies through shared memory, sm_90: one thread moves a whole piece of a row with two
// instructions (global -> shared, completion counted on an mbarrier; shared -> global, completion tracked
// per thread in bulk groups), so bytes in flight no longer cost registers or load/store issue slots.
// Every address is 16-byte aligned and every size a multiple of 16 (rows are checked to be).
#pragma once

#include <cstdint>

#include "kernels/sync.cuh"

namespace expertlink::kernels {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// An mbarrier expecting one arrival per phase (the issuing thread's expect_tx).
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// global -> shared, `bytes` counted on `bar`'s current phase.
__device__ __forceinline__ void bulk_load(void* smem_dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_u32(smem_dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

// Waits for phase `parity` of `bar` to complete. Bounded like every wait: a local copy that does not land
// within the timeout is recorded (site kBulkCopy) and the caller leaves.
__device__ __forceinline__ bool mbar_wait(uint64_t* bar, uint32_t parity, const WaitContext& ctx) {
  uint32_t done = 0;
  const uint64_t start = global_timer_ns();
  for (;;) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
    if (done) return true;
    const uint64_t waited = global_timer_ns() - start;
    if (waited > ctx.timeout_ns) {
      record_timeout(ctx, WaitSite::kBulkCopy, ctx.rank, 0, parity, 0, waited);
      return false;
    }
  }
}

// shared -> global (a peer's window address works too), in the thread's current bulk group.
__device__ __forceinline__ void bulk_store(void* dst, const void* smem_src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
               "r"(smem_u32(smem_src)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Until at most N of this thread's bulk groups still read their shared source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Until all of this thread's bulk stores are complete (written), then ordered before the thread's later
// generic-proxy operations (the release that publishes them).
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

}  // namespace expertlink::kernels
