// Device synchronisation primitives shared by all kernels.
//
// Memory protocol: a producer writes its payload with ordinary stores (to a peer over NVLink or locally),
// then publishes a 64-bit monotonically increasing signal with st.release.sys; the consumer polls the
// signal with ld.acquire.sys and reads the payload after it sees the expected value. System scope is
// required because producer and consumer are on different GPUs. Signals only grow, so nothing is reset
// between rounds (and CUDA-graph replays keep working).
//
// Every wait is bounded (wait_geq): on timeout it fills the host-mapped WaitRecord (who waited, for whom,
// on which counter, expected vs seen) and returns false; callers leave the kernel.
#pragma once

#include <cstdint>

#include "comm/wait_record.hpp"

namespace expertlink::kernels {

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t ld_volatile(const uint64_t* p) {
  return *reinterpret_cast<const volatile uint64_t*>(p);
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Everything a bounded wait needs to report a timeout.
struct WaitContext {
  WaitRecord* record;  // host-mapped
  uint64_t timeout_ns;
  int rank;
};

__device__ __forceinline__ bool wait_aborted(const WaitContext& ctx) {
  return *reinterpret_cast<const volatile int32_t*>(&ctx.record->flag) != 0;
}

static __device__ __noinline__ void record_timeout(const WaitContext& ctx, WaitSite site, int peer,
                                                   int counter, uint64_t expected, uint64_t seen,
                                                   uint64_t waited_ns) {
  if (atomicCAS(&ctx.record->flag, 0, 1) != 0) return;  // someone else reports
  WaitRecord* r = ctx.record;
  r->site = static_cast<int32_t>(site);
  r->rank = ctx.rank;
  r->peer = peer;
  r->counter = counter;
  r->expected = expected;
  r->seen = seen;
  r->waited_ns = waited_ns;
  __threadfence_system();
  atomicExch(&r->flag, 2);
}

// Waits until *signal >= expected, polling every sleep_ns nanoseconds (0: back to back; many waiters
// of one flag may want fewer polls). Returns false (after recording, unless another waiter already did)
// when the timeout passes or another wait of this window has failed.
__device__ __forceinline__ bool wait_geq(const uint64_t* signal, uint64_t expected, const WaitContext& ctx,
                                         WaitSite site, int peer, int counter, uint32_t sleep_ns = 0) {
  uint64_t seen = ld_acquire_sys(signal);
  if (seen >= expected) return true;
  const uint64_t start = global_timer_ns();
  for (uint32_t polls = 1;; ++polls) {
    if (sleep_ns != 0) __nanosleep(sleep_ns);
    seen = ld_acquire_sys(signal);
    if (seen >= expected) return true;
    if ((polls & 255u) == 0) {
      uint64_t waited = global_timer_ns() - start;
      if (waited > ctx.timeout_ns) {
        record_timeout(ctx, site, peer, counter, expected, seen, waited);
        return false;
      }
      if (wait_aborted(ctx)) return false;
    }
  }
}

}  // namespace expertlink::kernels
